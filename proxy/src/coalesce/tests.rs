//! Unit tests of the queue's front: the compatibility key, ticket
//! headers and how a caller's array is cut into chunks.

use super::*;
use crate::api::ItemForm;
use serde_json::Map;

/// A tiny deterministic generator (xorshift), so the property test needs
/// no extra crate and fails the same way every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random request body without its items: a few of the fields clients
/// send, with a few values each.
fn random_template(rng: &mut Rng) -> Map<String, Value> {
    let fields: [(&str, &[Value]); 7] = [
        ("model", &[json!("m"), json!("other")]),
        ("temperature", &[json!(0.0), json!(0.5), json!(1)]),
        ("max_tokens", &[json!(8), json!(16)]),
        ("n", &[json!(1), json!(2)]),
        ("seed", &[json!(7), Value::Null]),
        ("stop", &[json!(["\n"]), json!("."), json!([])]),
        ("logit_bias", &[json!({"1": 2}), json!({"1": 3})]),
    ];
    let mut template = Map::new();
    for (name, values) in fields {
        if rng.below(2) == 0 {
            let value = values[rng.below(values.len() as u64) as usize].clone();
            template.insert(name.to_string(), value);
        }
    }
    template
}

#[test]
fn requests_share_a_key_exactly_when_everything_but_the_items_is_equal() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let paths = ["/v1/completions", "/v1/embeddings", "/v1/completions?x=1"];
    let forms = [ItemForm::Text, ItemForm::Tokens];
    let auths = [None, Some("Bearer a"), Some("Bearer b")];
    let mut cases = Vec::new();
    for _ in 0..400 {
        let path = paths[rng.below(3) as usize];
        let form = forms[rng.below(2) as usize];
        let template = random_template(&mut rng);
        let mut headers = HeaderMap::new();
        if let Some(auth) = auths[rng.below(3) as usize] {
            headers.insert("authorization", auth.parse().unwrap());
        }
        let key = batch::compatibility_key(path, form, &template, &headers);
        cases.push((path, form, template, headers, key));
    }
    for x in &cases {
        for y in &cases {
            let same = x.0 == y.0 && x.1 == y.1 && x.2 == y.2 && x.3 == y.3;
            assert_eq!(x.4 == y.4, same, "{:?} vs {:?}", x.4, y.4);
        }
    }
}

fn settings() -> BatchSettings {
    let config: BatchConfig = toml::from_str("max_batch = 3\nmax_batch_tokens = 10").unwrap();
    BatchSettings::from_config(&config)
}

#[test]
fn tickets_read_priority_deadline_and_tenant() {
    let mut headers = HeaderMap::new();
    headers.insert(PRIORITY_HEADER, "9".parse().unwrap());
    headers.insert(DEADLINE_HEADER, "250".parse().unwrap());
    headers.insert("authorization", "Bearer secret".parse().unwrap());
    let ticket = Ticket::from_headers(&headers, &settings()).unwrap();
    assert_eq!(ticket.priority, 9);
    assert_eq!(ticket.deadline_ms, 250);
    assert!(ticket.deadline.is_some());
    assert!(ticket.tenant.starts_with("bearer:"));
    assert!(!ticket.tenant.contains("secret"));

    let ticket = Ticket::from_headers(&HeaderMap::new(), &settings()).unwrap();
    assert_eq!(ticket.priority, DEFAULT_PRIORITY);
    assert!(ticket.deadline.is_none());

    headers.insert(PRIORITY_HEADER, "high".parse().unwrap());
    let err = Ticket::from_headers(&headers, &settings()).unwrap_err();
    assert!(err.message.contains(PRIORITY_HEADER), "{err}");
}

#[test]
fn a_route_priority_takes_the_place_of_the_header() {
    let mut headers = HeaderMap::new();
    headers.insert(PRIORITY_HEADER, "2".parse().unwrap());
    let from_header = Ticket::from_headers(&headers, &settings()).unwrap();

    let routed = from_header.clone().with_route_priority(Some(8));
    assert_eq!(routed.priority, 8);
    let unrouted = from_header.clone().with_route_priority(None);
    assert_eq!(unrouted.priority, 2);
    let too_high = from_header.with_route_priority(Some(200));
    assert_eq!(too_high.priority, 9);

    // Without the header, the route's priority still applies.
    let plain = Ticket::from_headers(&HeaderMap::new(), &settings()).unwrap();
    assert_eq!(plain.with_route_priority(Some(0)).priority, 0);
}

#[tokio::test]
async fn arrays_are_cut_by_items_and_tokens() {
    let pool = crate::upstream::Pool::new(
        &toml::from_str("name = \"p\"\nendpoints = [\"http://127.0.0.1:9\"]").unwrap(),
    )
    .unwrap();
    let coalescer = Coalescer::start(Arc::new(pool), settings());
    let body = r#"{"model": "p", "input": ["a", "b", "c", "d", "eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee", "f"]}"#;
    let request = ApiRequest::parse(Endpoint::Embeddings, body.as_bytes()).unwrap();
    let sizes: Vec<usize> = coalescer.chunks(&request).iter().map(Vec::len).collect();
    // Three items a chunk; the 10-token input goes alone.
    assert_eq!(sizes, vec![3, 1, 1, 1]);
}
