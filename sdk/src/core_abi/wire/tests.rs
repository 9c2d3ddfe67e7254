use super::*;

fn pair(key: &str, value: &str) -> (String, String) {
    (key.to_owned(), value.to_owned())
}

fn encoded(encode: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    encode(&mut out);
    out
}

fn full_route() -> Decision {
    Route::cascade("s", "big")
        .with_max_tokens_cap(5)
        .with_attribute("k", "v")
        .into()
}

fn sample_answer() -> Answer {
    let mut answer = Answer::new("small", "héllo", vec![-0.5, -2.25])
        .with_finish_reason("stop")
        .with_partial(true);
    answer.latency_ms = 1234;
    answer.attributes = vec![pair("a", "b")];
    answer
}

fn sample_messages() -> Vec<Message> {
    let mut tool = Message::new("tool", "");
    tool.attributes = vec![pair("x", "1"), pair("y", "")];
    vec![Message::new("user", "hi ✓"), tool]
}

/// Every strict prefix of `bytes` must fail to decode.
fn assert_every_prefix_fails<T: fmt::Debug>(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> Result<T, WireError>,
) {
    for len in 0..bytes.len() {
        let result = decode(&bytes[..len]);
        assert!(result.is_err(), "prefix of {len} bytes decoded: {result:?}");
    }
}

#[test]
fn route_is_encoded_byte_for_byte_as_specified() {
    let bytes = encoded(|out| encode_decision(&full_route(), out));
    let expected: &[u8] = &[
        0, // route
        1, 0, 0, 0, b's', // pool
        1, 5, 0, 0, 0, // has_cap, cap
        1, 3, 0, 0, 0, b'b', b'i', b'g', // has_escalate, escalate_to
        1, 0, 0, 0, // one attribute
        1, 0, 0, 0, b'k', 1, 0, 0, 0, b'v',
    ];
    assert_eq!(bytes, expected);
}

#[test]
fn plain_route_writes_absent_cap_and_escalation_as_zero_flags() {
    let bytes = encoded(|out| encode_decision(&Decision::route("p"), out));
    assert_eq!(bytes, [0, 1, 0, 0, 0, b'p', 0, 0, 0, 0, 0, 0]);
}

#[test]
fn rejection_is_encoded_byte_for_byte_as_specified() {
    let bytes = encoded(|out| encode_decision(&Decision::reject(403, "no"), out));
    assert_eq!(bytes, [1, 0x93, 0x01, 2, 0, 0, 0, b'n', b'o', 0, 0, 0, 0]);
}

#[test]
fn verdicts_are_encoded_byte_for_byte_as_specified() {
    assert_eq!(encoded(|out| encode_verdict(&Verdict::Accept, out)), [0]);
    let escalate = Verdict::escalate_to("l", "r");
    let expected = [1, 1, 0, 0, 0, b'l', 1, 0, 0, 0, b'r', 0, 0, 0, 0];
    assert_eq!(encoded(|out| encode_verdict(&escalate, out)), expected);
}

#[test]
fn answer_is_encoded_field_by_field_as_specified() {
    let mut answer = Answer::new("p", "t", vec![-1.0]).with_finish_reason("");
    answer.latency_ms = 7;
    let bytes = encoded(|out| encode_answer(&answer, out));
    let mut expected = vec![1, 0, 0, 0, b'p', 1, 0, 0, 0, b't', 0, 0, 0, 0];
    expected.extend_from_slice(&1u32.to_le_bytes()); // completion_tokens
    expected.extend_from_slice(&1u32.to_le_bytes()); // n
    expected.extend_from_slice(&(-1.0f32).to_le_bytes());
    let s = answer.summary;
    for value in [s.mean, s.min, s.share_below, s.threshold] {
        expected.extend_from_slice(&value.to_le_bytes());
    }
    expected.extend_from_slice(&7u32.to_le_bytes());
    expected.extend_from_slice(&[0, 0, 0, 0, 0]); // partial, no attributes
    assert_eq!(bytes, expected);
}

#[test]
fn decisions_round_trip() {
    let mut rejection = Rejection::new(599, "too long");
    rejection.attributes.push(pair("k", "v"));
    let decisions = [
        Decision::route("small"),
        full_route(),
        Route::new("x").with_max_tokens_cap(u32::MAX).into(),
        rejection.into(),
    ];
    for decision in decisions {
        let bytes = encoded(|out| encode_decision(&decision, out));
        assert_eq!(decode_decision(&bytes), Ok(decision));
    }
}

#[test]
fn verdicts_round_trip() {
    let mut escalation = Escalation {
        pool: String::new(),
        reason: "low-confidence".into(),
        attributes: Vec::new(),
    };
    escalation.attributes.push(pair("k", "v"));
    for verdict in [Verdict::Accept, Verdict::Escalate(escalation)] {
        let bytes = encoded(|out| encode_verdict(&verdict, out));
        assert_eq!(decode_verdict(&bytes), Ok(verdict));
    }
}

#[test]
fn messages_strings_and_pairs_round_trip() {
    let messages = sample_messages();
    let bytes = encoded(|out| encode_messages(&messages, out));
    assert_eq!(decode_messages(&bytes), Ok(messages));

    let strings = vec!["a".to_owned(), String::new(), "ü".to_owned()];
    let bytes = encoded(|out| encode_strings(&strings, out));
    assert_eq!(decode_strings(&bytes), Ok(strings));

    let pairs = vec![pair("x-tier", "gold"), pair("x-tier", "")];
    let bytes = encoded(|out| encode_pairs(&pairs, out));
    assert_eq!(decode_pairs(&bytes), Ok(pairs));

    assert_eq!(decode_messages(&[0, 0, 0, 0]), Ok(Vec::new()));
}

#[test]
fn answer_round_trips_with_every_field() {
    let answer = sample_answer();
    let bytes = encoded(|out| encode_answer(&answer, out));
    let decoded = decode_answer(&bytes);
    assert_eq!(decoded, Ok(answer));
}

#[test]
fn text_items_are_raw_utf8() {
    assert_eq!(decode_text("auto ✓".as_bytes()), Ok("auto ✓".into()));
    assert_eq!(decode_text(b""), Ok(String::new()));
    assert_eq!(decode_text(b"a\xffb"), Err(WireError::BadUtf8 { at: 0 }));
}

#[test]
fn truncated_input_is_rejected_at_every_length() {
    let messages = encoded(|out| encode_messages(&sample_messages(), out));
    assert_every_prefix_fails(&messages, decode_messages);
    let answer = encoded(|out| encode_answer(&sample_answer(), out));
    assert_every_prefix_fails(&answer, decode_answer);
    let decision = encoded(|out| encode_decision(&full_route(), out));
    assert_every_prefix_fails(&decision, decode_decision);
    let reject = encoded(|out| encode_decision(&Decision::reject(400, "x"), out));
    assert_every_prefix_fails(&reject, decode_decision);
    let verdict = encoded(|out| encode_verdict(&Verdict::escalate("r"), out));
    assert_every_prefix_fails(&verdict, decode_verdict);
    let strings = encoded(|out| encode_strings(&["ab".to_owned()], out));
    assert_every_prefix_fails(&strings, decode_strings);
    let pairs = encoded(|out| encode_pairs(&[pair("k", "v")], out));
    assert_every_prefix_fails(&pairs, decode_pairs);
}

#[test]
fn truncation_names_offset_and_shortfall() {
    // A string that claims 5 bytes and has 2.
    let err = decode_strings(&[1, 0, 0, 0, 5, 0, 0, 0, b'a', b'b']);
    let expected = WireError::Truncated {
        at: 8,
        wanted: 5,
        left: 2,
    };
    assert_eq!(err, Err(expected.clone()));
    assert_eq!(
        expected.to_string(),
        "truncated at byte 8: needs 5 bytes, 2 left"
    );
}

#[test]
fn huge_counts_are_rejected_before_reserving_memory() {
    let huge = u32::MAX.to_le_bytes();
    let truncated_at_0 = |r: Result<usize, WireError>| {
        assert!(
            matches!(r, Err(WireError::Truncated { at: 0, .. })),
            "{r:?}"
        );
    };
    truncated_at_0(decode_strings(&huge).map(|v| v.len()));
    truncated_at_0(decode_pairs(&huge).map(|v| v.len()));
    truncated_at_0(decode_messages(&huge).map(|v| v.len()));
}

#[test]
fn bad_tags_and_flags_are_rejected() {
    let err = decode_decision(&[2]);
    let tag = |field, at, byte| WireError::BadTag { field, at, byte };
    assert_eq!(err, Err(tag("decision", 0, 2)));
    assert_eq!(decode_verdict(&[7]), Err(tag("verdict", 0, 7)));

    // has_cap of 2 in an otherwise valid route.
    let mut route = encoded(|out| encode_decision(&Decision::route("p"), out));
    route[6] = 2;
    assert_eq!(decode_decision(&route), Err(tag("has_cap", 6, 2)));
    route[6] = 0;
    route[7] = 9;
    assert_eq!(decode_decision(&route), Err(tag("has_escalate", 7, 9)));

    // partial is the byte before the attributes.
    let sample = sample_answer();
    let mut answer = encoded(|out| encode_answer(&sample, out));
    let attributes = encoded(|out| encode_pairs(&sample.attributes, out));
    let at = answer.len() - attributes.len() - 1;
    assert_eq!(answer[at], 1, "partial must sit at byte {at}");
    answer[at] = 3;
    assert_eq!(decode_answer(&answer), Err(tag("partial", at, 3)));
}

#[test]
fn bad_utf8_is_rejected_in_every_string_position() {
    let message = Message::new("user", "ab");
    let mut bytes = encoded(|out| encode_messages(&[message], out));
    // count (4), role len (4), "user" (4), content len (4), then "ab".
    bytes[16] = 0xff;
    assert_eq!(decode_messages(&bytes), Err(WireError::BadUtf8 { at: 16 }));

    let mut pairs = encoded(|out| encode_pairs(&[pair("k", "v")], out));
    pairs[8] = 0xc3; // a lone lead byte as the key
    assert_eq!(decode_pairs(&pairs), Err(WireError::BadUtf8 { at: 8 }));

    let mut reject = encoded(|out| encode_decision(&Decision::reject(500, "é"), out));
    reject[7] = b'x'; // cut the two-byte character in half
    assert_eq!(decode_decision(&reject), Err(WireError::BadUtf8 { at: 7 }));
}

#[test]
fn trailing_bytes_are_rejected() {
    let trailing = |count| WireError::TrailingBytes { count };
    let mut bytes = encoded(|out| encode_messages(&sample_messages(), out));
    bytes.push(0);
    assert_eq!(decode_messages(&bytes), Err(trailing(1)));
    let mut answer = encoded(|out| encode_answer(&sample_answer(), out));
    answer.extend_from_slice(&[1, 2]);
    assert_eq!(decode_answer(&answer), Err(trailing(2)));
    assert_eq!(decode_verdict(&[0, 0]), Err(trailing(1)));
    assert_eq!(decode_strings(&[0, 0, 0, 0, 9]), Err(trailing(1)));
    assert_eq!(decode_pairs(&[0, 0, 0, 0, 0, 0, 0]), Err(trailing(3)));
    let mut decision = encoded(|out| encode_decision(&full_route(), out));
    decision.push(0);
    assert_eq!(decode_decision(&decision), Err(trailing(1)));
}

#[test]
fn endpoint_codes_round_trip_and_unknown_codes_fail() {
    let endpoints = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
    ];
    for (code, endpoint) in endpoints.into_iter().enumerate() {
        assert_eq!(endpoint_code(endpoint), code as i32);
        assert_eq!(endpoint_from_code(code as i32), Ok(endpoint));
    }
    for code in [3, -1] {
        let err = endpoint_from_code(code);
        let expected = bad_parameter("endpoint", code.into());
        assert_eq!(err, Err(expected));
    }
}

#[test]
fn max_tokens_and_stream_parameters_are_range_checked() {
    assert_eq!(max_tokens_from_param(-1), Ok(None));
    assert_eq!(max_tokens_from_param(0), Ok(Some(0)));
    let max = i64::from(u32::MAX);
    assert_eq!(max_tokens_from_param(max), Ok(Some(u32::MAX)));
    for value in [-2, max + 1, i64::MIN] {
        let expected = Err(bad_parameter("max_tokens", value));
        assert_eq!(max_tokens_from_param(value), expected);
    }
    assert_eq!(stream_from_param(0), Ok(false));
    assert_eq!(stream_from_param(1), Ok(true));
    assert_eq!(stream_from_param(2), Err(bad_parameter("stream", 2)));
}

#[test]
fn pack_puts_the_pointer_high_and_the_length_low() {
    assert_eq!(pack(0x10, 0x20), 0x10_0000_0020);
    assert_eq!(pack(u32::MAX, u32::MAX), -1);
    assert_eq!(unpack(pack(0x8000_0001, 7)), (0x8000_0001, 7));
    assert_eq!(pack(0, 0), 0);
}

#[test]
fn item_codes_match_the_specification() {
    let items = [
        (Item::Model, 1, "MODEL"),
        (Item::Messages, 2, "MESSAGES"),
        (Item::Prompt, 3, "PROMPT"),
        (Item::Header, 4, "HEADER"),
        (Item::Headers, 5, "HEADERS"),
        (Item::Attribute, 6, "ATTRIBUTE"),
        (Item::Answer, 7, "ANSWER"),
    ];
    for (item, code, name) in items {
        assert_eq!((item.code(), item.name()), (code, name));
    }
}

/// A fake `read` import holding `item`: records the capacity offered on
/// each call, copies the item when it fits and returns its length.
fn host_holding<'o>(item: &[u8], offered: &'o mut Vec<usize>) -> impl FnMut(&mut [u8]) -> i32 + 'o {
    let item = item.to_vec();
    move |out: &mut [u8]| {
        offered.push(out.len());
        if item.len() <= out.len() {
            out[..item.len()].copy_from_slice(&item);
        }
        item.len() as i32
    }
}

#[test]
fn read_offers_256_bytes_first_and_fits_small_items_in_one_call() {
    let mut scratch = Vec::new();
    let mut offered = Vec::new();
    let read = host_holding(b"auto", &mut offered);
    let got = read_with_retry(&mut scratch, read, |b| b.to_vec());
    assert_eq!(got, Ok(Some(b"auto".to_vec())));
    assert_eq!(offered, [256]);
}

#[test]
fn read_retries_once_with_the_named_length_and_keeps_it() {
    let big = vec![7u8; 1000];
    let mut scratch = Vec::new();
    let mut offered = Vec::new();
    let read = host_holding(&big, &mut offered);
    let got = read_with_retry(&mut scratch, read, |b| b.to_vec());
    assert_eq!(got, Ok(Some(big)));
    assert_eq!(offered, [256, 1000]);

    // The next read offers the grown buffer at once.
    offered.clear();
    let read = host_holding(&[1; 600], &mut offered);
    let got = read_with_retry(&mut scratch, read, |b| b.len());
    assert_eq!((got, offered.as_slice()), (Ok(Some(600)), &[1000][..]));
}

#[test]
fn read_reports_absent_items_and_rejects_impossible_lengths() {
    let mut scratch = Vec::new();
    let absent = read_with_retry(&mut scratch, |_| -1, |b| b.len());
    assert_eq!(absent, Ok(None));
    let negative = read_with_retry(&mut scratch, |_| -2, |b| b.len());
    assert_eq!(negative, Err(bad_parameter("read's length", -2)));

    // An item that grows between the two calls.
    let mut size = 300;
    let growing = |_: &mut [u8]| {
        size += 1;
        size
    };
    let result = read_with_retry(&mut Vec::new(), growing, |b| b.len());
    let expected = bad_parameter("read's length after a retry", 302);
    assert_eq!(result, Err(expected));
}
