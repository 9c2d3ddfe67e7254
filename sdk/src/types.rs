//! Plain Rust views of the WIT `types` interface: chat messages, what a
//! policy answers, and the small pool's answer it reviews. The request
//! itself, a host resource read on demand, is in `request.rs`.
//!
//! The structs are `#[non_exhaustive]` so that later SDK versions can add
//! fields (fed from WIT `attributes` or a newer package) without breaking
//! plugins; build them with the constructors and `with_*` methods.

/// The OpenAI endpoint a request arrived on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    ChatCompletions,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/embeddings`.
    Embeddings,
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`, as the client sent it.
    pub role: String,
    /// The message text; non-text parts are left out.
    pub content: String,
    /// Further facts from the host, as key/value pairs; empty for now.
    pub attributes: Vec<(String, String)>,
}

impl Message {
    /// A message with the given role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
            attributes: Vec::new(),
        }
    }
}

/// Send the request to a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Route {
    /// Name of the pool that serves the request.
    pub pool: String,
    /// Upper bound on generated tokens; the host sends the smaller of this
    /// and the client's `max_tokens`. `None` (the default) leaves the
    /// client's value alone.
    pub max_tokens_cap: Option<u32>,
    /// Small-first: the pool to escalate to when
    /// [`Policy::review`](crate::Policy::review) escalates without naming
    /// one. `None` (the default) sends the request to `pool` only, without
    /// a review.
    pub escalate_to: Option<String>,
    /// Hints to the host, as key/value pairs; see the `with_*` methods
    /// for the keys the host reads.
    pub attributes: Vec<(String, String)>,
}

/// Attribute key of [`Route::with_system_instruction`].
pub const SYSTEM_INSTRUCTION_KEY: &str = "switchyard.system-instruction";
/// Attribute key of [`Route::with_keep_turns`].
pub const KEEP_TURNS_KEY: &str = "switchyard.keep-turns";
/// Attribute key of [`Route::with_priority`].
pub const PRIORITY_KEY: &str = "switchyard.priority";
/// Attribute key prefix of [`Route::with_label`].
pub const LABEL_PREFIX: &str = "switchyard.label.";

/// How urgent a request is, for [`Route::with_priority`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Priority {
    /// Background work.
    Low,
    /// The default.
    Normal,
    /// Interactive or premium work.
    High,
}

impl Priority {
    /// The attribute value: `low`, `normal` or `high`.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Low => "low",
            Priority::Normal => "normal",
            Priority::High => "high",
        }
    }
}

impl Route {
    /// A route to `pool` with no cap and no attributes.
    pub fn new(pool: impl Into<String>) -> Self {
        Route {
            pool: pool.into(),
            max_tokens_cap: None,
            escalate_to: None,
            attributes: Vec::new(),
        }
    }

    /// Small-first: `small` answers first,
    /// [`Policy::review`](crate::Policy::review) judges its answer, and an
    /// escalation goes to `large`.
    pub fn cascade(small: impl Into<String>, large: impl Into<String>) -> Self {
        Route::new(small).with_escalate_to(large)
    }

    /// Caps the tokens generated at `cap`.
    pub fn with_max_tokens_cap(mut self, cap: u32) -> Self {
        self.max_tokens_cap = Some(cap);
        self
    }

    /// Sets the pool an escalation goes to, which makes the route
    /// small-first.
    pub fn with_escalate_to(mut self, pool: impl Into<String>) -> Self {
        self.escalate_to = Some(pool.into());
        self
    }

    /// Asks the host to add `text` as a leading system message (chat
    /// requests), for example "Answer concisely.".
    pub fn with_system_instruction(self, text: impl Into<String>) -> Self {
        self.with_attribute(SYSTEM_INSTRUCTION_KEY, text)
    }

    /// Asks the host to keep only the last `turns` non-system messages of
    /// a chat request; system messages are always kept.
    pub fn with_keep_turns(self, turns: u32) -> Self {
        self.with_attribute(KEEP_TURNS_KEY, turns.to_string())
    }

    /// Tells the host how urgent the request is: its place in a
    /// coalescing pool's queue (low 2, normal 5, high 8 of 0..=9), in place
    /// of the client's `x-switchyard-priority` header; logged too.
    pub fn with_priority(self, priority: Priority) -> Self {
        self.with_attribute(PRIORITY_KEY, priority.as_str())
    }

    /// Adds a label the host logs with the request (`name` should be
    /// short and fixed, the value bounded).
    pub fn with_label(self, name: &str, value: impl Into<String>) -> Self {
        self.with_attribute(format!("{LABEL_PREFIX}{name}"), value)
    }

    /// The value of the first attribute called `key`.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        find(&self.attributes, key, |a, b| a == b)
    }

    /// Adds a hint for the host.
    pub fn with_attribute(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.push((key.into(), value.into()));
        self
    }
}

/// Refuse the request without sending it upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Rejection {
    /// HTTP status for the client, 400 to 599 (others become 500).
    pub status: u16,
    /// Reason returned in the OpenAI error body.
    pub message: String,
    /// Hints to the host; none are defined yet.
    pub attributes: Vec<(String, String)>,
}

impl Rejection {
    /// A rejection with `status` and `message` and no attributes.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        Rejection {
            status,
            message: message.into(),
            attributes: Vec::new(),
        }
    }
}

/// A policy's answer for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Decision {
    /// Serve the request from a pool.
    Route(Route),
    /// Answer the client with an error.
    Reject(Rejection),
}

impl Decision {
    /// Route to `pool` with no token cap.
    pub fn route(pool: impl Into<String>) -> Self {
        Decision::Route(Route::new(pool))
    }

    /// Reject with HTTP `status` and `message`.
    pub fn reject(status: u16, message: impl Into<String>) -> Self {
        Decision::Reject(Rejection::new(status, message))
    }

    /// The pool routed to, or `None` for a rejection.
    pub fn pool(&self) -> Option<&str> {
        match self {
            Decision::Route(route) => Some(&route.pool),
            Decision::Reject(_) => None,
        }
    }
}

impl From<Route> for Decision {
    fn from(route: Route) -> Self {
        Decision::Route(route)
    }
}

impl From<Rejection> for Decision {
    fn from(rejection: Rejection) -> Self {
        Decision::Reject(rejection)
    }
}

/// Summary of an answer's per-token log-probabilities (natural log).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub struct LogprobSummary {
    /// Mean log-probability; 0 with no tokens.
    pub mean: f32,
    /// Lowest log-probability; 0 with no tokens.
    pub min: f32,
    /// Share (0 to 1) of tokens below `threshold`.
    pub share_below: f32,
    /// The host's threshold for `share_below`.
    pub threshold: f32,
}

impl LogprobSummary {
    /// The summary of `logprobs` with `threshold` for `share_below`, as the
    /// host computes it.
    pub fn of(logprobs: &[f32], threshold: f32) -> Self {
        if logprobs.is_empty() {
            return LogprobSummary {
                threshold,
                ..LogprobSummary::default()
            };
        }
        let count = logprobs.len() as f32;
        let sum: f32 = logprobs.iter().sum();
        let min = logprobs.iter().copied().fold(f32::INFINITY, f32::min);
        let below = logprobs.iter().filter(|&&l| l < threshold).count() as f32;
        LogprobSummary {
            mean: sum / count,
            min,
            share_below: below / count,
            threshold,
        }
    }
}

/// The small pool's answer to a small-first request, for
/// [`Policy::review`](crate::Policy::review).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Answer {
    /// The pool that answered.
    pub pool: String,
    /// The answer's text.
    pub text: String,
    /// `stop`, `length`, ..., or empty when partial or unknown.
    pub finish_reason: String,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Log-probability of each generated token, in order.
    pub token_logprobs: Vec<f32>,
    /// Summary of `token_logprobs`.
    pub summary: LogprobSummary,
    /// Time the small pool took for this answer or prefix, in ms.
    pub latency_ms: u32,
    /// Only the first tokens of a streamed answer (probe mode).
    pub partial: bool,
    /// Further facts from the host; empty for now.
    pub attributes: Vec<(String, String)>,
}

/// Threshold `Answer::new` summarises with: -2.3 (about ln 0.1), the
/// host's default `[policy.cascade] low_logprob`.
const DEFAULT_LOW_LOGPROB: f32 = -2.3;

impl Answer {
    /// A complete answer from `pool` with `text`, finish reason `stop` and
    /// the given token log-probabilities (summarised with the host's
    /// default threshold, -2.3), for tests.
    pub fn new(pool: impl Into<String>, text: impl Into<String>, logprobs: Vec<f32>) -> Self {
        Answer {
            pool: pool.into(),
            text: text.into(),
            finish_reason: "stop".into(),
            completion_tokens: u32::try_from(logprobs.len()).unwrap_or(u32::MAX),
            summary: LogprobSummary::of(&logprobs, DEFAULT_LOW_LOGPROB),
            token_logprobs: logprobs,
            latency_ms: 0,
            partial: false,
            attributes: Vec::new(),
        }
    }

    /// Sets the finish reason.
    pub fn with_finish_reason(mut self, reason: impl Into<String>) -> Self {
        self.finish_reason = reason.into();
        self
    }

    /// Marks the answer as a streamed prefix.
    pub fn with_partial(mut self, partial: bool) -> Self {
        self.partial = partial;
        self
    }
}

/// Send the request to another pool instead of accepting the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Escalation {
    /// Pool that answers instead; empty means the route's `escalate_to`.
    pub pool: String,
    /// Short, fixed reason: logged and used as a metric label.
    pub reason: String,
    /// Hints to the host; none are defined yet.
    pub attributes: Vec<(String, String)>,
}

/// A policy's judgement of a small model's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Give the client the small answer.
    Accept,
    /// Ask another pool.
    Escalate(Escalation),
}

impl Verdict {
    /// Escalate to the route's `escalate_to` pool, for `reason`.
    pub fn escalate(reason: impl Into<String>) -> Self {
        Verdict::escalate_to("", reason)
    }

    /// Escalate to `pool`, for `reason`.
    pub fn escalate_to(pool: impl Into<String>, reason: impl Into<String>) -> Self {
        Verdict::Escalate(Escalation {
            pool: pool.into(),
            reason: reason.into(),
            attributes: Vec::new(),
        })
    }

    /// Whether this verdict escalates.
    pub fn is_escalate(&self) -> bool {
        matches!(self, Verdict::Escalate(_))
    }

    /// The escalation reason, or `None` for accept.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Verdict::Accept => None,
            Verdict::Escalate(e) => Some(&e.reason),
        }
    }
}

pub(crate) fn find<'a>(
    pairs: &'a [(String, String)],
    name: &str,
    eq: impl Fn(&str, &str) -> bool,
) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| eq(k, name))
        .map(|(_, v)| v.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_logprobs_counts_mean_min_and_share_below() {
        let s = LogprobSummary::of(&[-0.5, -1.5, -3.0, -3.0], -2.0);
        assert!((s.mean - (-2.0)).abs() < 1e-6, "{s:?}");
        assert_eq!(s.min, -3.0);
        assert_eq!(s.share_below, 0.5);
        assert_eq!(LogprobSummary::of(&[], -2.0).mean, 0.0);
    }

    #[test]
    fn route_helpers_write_the_documented_attributes() {
        let r = Route::cascade("small", "large")
            .with_system_instruction("be brief")
            .with_keep_turns(4)
            .with_priority(Priority::High)
            .with_label("tier", "gold");
        assert_eq!(r.escalate_to.as_deref(), Some("large"));
        assert_eq!(r.attribute(SYSTEM_INSTRUCTION_KEY), Some("be brief"));
        assert_eq!(r.attribute(KEEP_TURNS_KEY), Some("4"));
        assert_eq!(r.attribute(PRIORITY_KEY), Some("high"));
        assert_eq!(r.attribute("switchyard.label.tier"), Some("gold"));
    }

    #[test]
    fn decision_route_names_the_pool() {
        assert_eq!(Decision::route("small").pool(), Some("small"));
        assert_eq!(Decision::reject(403, "no").pool(), None);
    }
}
