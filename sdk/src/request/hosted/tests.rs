use super::*;
use crate::core_abi::fake_host::{hold, reads};

fn encoded(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&mut out);
    out
}

fn read_of(item: Item, key: &str) -> (Item, String) {
    (item, key.to_owned())
}

/// Runs `check` on a chat request of 2 messages, 10 characters, max 64
/// tokens, streamed; the items it reads come from the fake host.
fn with_request(check: impl FnOnce(&Request<'_>)) {
    let call = HostCall::default();
    let req = Request::hosted(&call, Endpoint::ChatCompletions, 2, 10, Some(64), true);
    check(&req);
}

#[test]
fn call_parameters_cost_no_read() {
    with_request(|req| {
        assert_eq!(req.endpoint(), Endpoint::ChatCompletions);
        assert_eq!(req.message_count(), 2);
        assert_eq!(req.prompt_chars(), 10);
        assert_eq!(req.max_tokens(), Some(64));
        assert!(req.stream());
        let text = format!("{req:?}");
        assert!(text.contains("model: OnceCell(<uninit>)"), "{text}");
    });
    assert_eq!(reads(), []);
}

#[test]
fn model_is_read_once_on_first_use() {
    hold(Item::Model, "", "auto");
    with_request(|req| {
        assert_eq!(reads(), []);
        assert_eq!(req.model(), "auto");
        assert_eq!(req.model(), "auto");
        let text = format!("{req:?}");
        assert!(text.contains("model: OnceCell(\"auto\")"), "{text}");
    });
    assert_eq!(reads(), [read_of(Item::Model, "")]);
}

#[test]
fn each_list_is_read_once_and_decoded() {
    let messages = vec![Message::new("user", "hi"), Message::new("user", "ho")];
    hold(
        Item::Messages,
        "",
        encoded(|out| wire::encode_messages(&messages, out)),
    );
    let prompt = vec!["p".to_owned()];
    hold(
        Item::Prompt,
        "",
        encoded(|out| wire::encode_strings(&prompt, out)),
    );
    with_request(|req| {
        for _ in 0..2 {
            assert_eq!(req.messages(), messages);
            assert_eq!(req.prompt(), prompt);
        }
    });
    let expected = [read_of(Item::Messages, ""), read_of(Item::Prompt, "")];
    assert_eq!(reads(), expected);
}

#[test]
fn header_asks_the_host_until_every_header_is_read() {
    let headers = vec![("x-tier".to_owned(), "gold".to_owned())];
    hold(
        Item::Headers,
        "",
        encoded(|out| wire::encode_pairs(&headers, out)),
    );
    hold(Item::Header, "x-tier", "gold");
    with_request(|req| {
        assert_eq!(req.header("X-Tier").as_deref(), Some("gold"));
        assert_eq!(req.header("x-none"), None);
        assert_eq!(req.headers(), headers);
        // Answered from the headers now: no more reads.
        assert_eq!(req.header("X-TIER").as_deref(), Some("gold"));
        assert_eq!(req.header("x-none"), None);
    });
    let expected = [
        read_of(Item::Header, "X-Tier"),
        read_of(Item::Header, "x-none"),
        read_of(Item::Headers, ""),
    ];
    assert_eq!(reads(), expected);
}

#[test]
fn attribute_asks_the_host_every_time() {
    hold(Item::Attribute, "k", "v");
    with_request(|req| {
        assert_eq!(req.attribute("k").as_deref(), Some("v"));
        assert_eq!(req.attribute("k").as_deref(), Some("v"));
        assert_eq!(req.attribute("K"), None);
    });
    let expected = [
        read_of(Item::Attribute, "k"),
        read_of(Item::Attribute, "k"),
        read_of(Item::Attribute, "K"),
    ];
    assert_eq!(reads(), expected);
}

#[test]
fn absent_lists_read_as_empty() {
    with_request(|req| {
        assert!(req.messages().is_empty());
        assert!(req.prompt().is_empty());
        assert!(req.headers().is_empty());
    });
    assert_eq!(reads().len(), 3);
}

#[test]
#[should_panic(expected = "malformed MODEL from the host: absent")]
fn absent_model_fails_the_call() {
    with_request(|req| {
        req.model();
    });
}

#[test]
#[should_panic(expected = "malformed MESSAGES from the host: 1 trailing bytes")]
fn malformed_messages_fail_the_call() {
    hold(Item::Messages, "", [0, 0, 0, 0, 7]);
    with_request(|req| {
        req.messages();
    });
}

#[test]
#[should_panic(expected = "malformed HEADER from the host: string at byte 0")]
fn a_header_that_is_not_utf8_fails_the_call() {
    hold(Item::Header, "x-bin", [0xff]);
    with_request(|req| {
        req.header("x-bin");
    });
}
