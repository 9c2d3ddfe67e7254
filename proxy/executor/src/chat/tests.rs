use super::*;
use crate::test_support::{open_model_or_skip, str_array, GgufBuilder};

const GREEDY_JSONL: &str = include_str!("../../tests/data/smollm2/greedy.jsonl");

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n\
                      {{ m.content }}<|im_end|>\n{% endfor %}\
                      {% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", text)]
}

#[test]
fn renders_every_reference_chat_prompt() {
    let Some(gguf) = open_model_or_skip("renders_every_reference_chat_prompt") else {
        return;
    };
    let template = ChatTemplate::from_gguf(&gguf).unwrap();

    let mut rendered = 0;
    for line in GREEDY_JSONL.lines().filter(|l| !l.trim().is_empty()) {
        let line: serde_json::Value = serde_json::from_str(line).unwrap();
        let Some(messages) = line.get("messages") else {
            continue;
        };
        let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone()).unwrap();
        let prompt = template.render(&messages, true).unwrap();
        assert_eq!(prompt, line["prompt"].as_str().unwrap());
        rendered += 1;
    }
    assert_eq!(rendered, 6);
}

#[test]
fn smollm_template_adds_its_default_system_message() {
    let Some(gguf) = open_model_or_skip("smollm_template_adds_its_default_system_message") else {
        return;
    };
    let template = ChatTemplate::from_gguf(&gguf).unwrap();

    let prompt = template.render(&user("hi"), false).unwrap();
    assert!(prompt.starts_with("<|im_start|>system\nYou are a helpful AI"));
    assert!(prompt.ends_with("<|im_start|>user\nhi<|im_end|>\n"));
    let own = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "hi"),
    ];
    let prompt = template.render(&own, true).unwrap();
    assert_eq!(
        prompt,
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n\
         <|im_start|>assistant\n"
    );
}

#[test]
fn generation_prompt_is_optional() {
    let template = ChatTemplate::new(CHATML, "<s>", "</s>").unwrap();
    let with = template.render(&user("hi"), true).unwrap();
    let without = template.render(&user("hi"), false).unwrap();
    assert_eq!(without, "<|im_start|>user\nhi<|im_end|>\n");
    assert_eq!(with, format!("{without}<|im_start|>assistant\n"));
}

#[test]
fn bos_and_eos_texts_are_available() {
    let source = "{{ bos_token }}{% for m in messages %}\
                  {{ m.content }}{{ eos_token }}{% endfor %}";
    let template = ChatTemplate::new(source, "<s>", "</s>").unwrap();
    assert_eq!(template.render(&user("a"), false).unwrap(), "<s>a</s>");
}

#[test]
fn block_tags_trim_like_hugging_face() {
    let source = concat!(
        "{% for m in messages %}\n",
        "    {% if m.role == 'user' %}\n",
        "[{{ m.content }}]\n",
        "    {% endif %}\n",
        "{% endfor %}",
    );
    let template = ChatTemplate::new(source, "", "").unwrap();
    assert_eq!(template.render(&user("x"), false).unwrap(), "[x]\n");
}

#[test]
fn syntax_errors_are_reported_not_panicked() {
    let err = ChatTemplate::new("{% for m in messages %}", "", "").unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with("the model's chat template does not compile: syntax error"),
        "{msg}"
    );
    assert!(msg.contains("(template line 1)"), "{msg}");
}

#[test]
fn raise_exception_becomes_a_render_error() {
    let source = "{% if messages[0].role != 'user' %}\
                  {{ raise_exception('conversations must start with a user message') }}\
                  {% endif %}ok";
    let template = ChatTemplate::new(source, "", "").unwrap();
    assert_eq!(template.render(&user("x"), false).unwrap(), "ok");
    let err = template
        .render(&[ChatMessage::new("assistant", "x")], false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("conversations must start with a user message"),
        "{err}"
    );
    assert!(
        err.starts_with("the model's chat template failed to render"),
        "{err}"
    );
}

#[test]
fn runtime_errors_are_reported_not_panicked() {
    for source in [
        "{{ messages[0].content.strip() }}",
        "{% for x in 42 %}{% endfor %}",
        "{{ messages | nosuchfilter }}",
    ] {
        let result = ChatTemplate::new(source, "", "").and_then(|t| t.render(&user("x"), true));
        assert!(result.is_err(), "{source}");
    }
}

#[test]
fn missing_template_says_what_to_do() {
    let file = GgufBuilder::new(3)
        .kv("tokenizer.ggml.tokens", str_array(&["<s>", "</s>"]))
        .write();
    let gguf = GgufFile::open(&file.0).unwrap();
    let err = ChatTemplate::from_gguf(&gguf).unwrap_err().to_string();
    assert!(err.contains("has no tokenizer.chat_template"), "{err}");
    assert!(err.contains("send a raw prompt"), "{err}");
}

#[test]
fn from_gguf_takes_token_texts_from_the_vocabulary() {
    let file = GgufBuilder::new(3)
        .kv(
            "tokenizer.ggml.tokens",
            str_array(&["<unk>", "<s>", "</s>"]),
        )
        .kv("tokenizer.ggml.bos_token_id", MetaValue::U32(1))
        .kv("tokenizer.ggml.eos_token_id", MetaValue::U32(2))
        .kv(
            TEMPLATE_KEY,
            MetaValue::Str("{{ bos_token }}|{{ eos_token }}".into()),
        )
        .write();
    let gguf = GgufFile::open(&file.0).unwrap();
    let template = ChatTemplate::from_gguf(&gguf).unwrap();
    assert_eq!(template.render(&[], false).unwrap(), "<s>|</s>");
}
