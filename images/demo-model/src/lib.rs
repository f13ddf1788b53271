//! A toy model behind an OpenAI-style HTTP API, for Kiln's pods and endpoints to run offline.
//!
//! It is what `KILN_DEMO_IMAGE` packages: small, static, deterministic. `GET /health` answers
//! 200 once serving. `POST /v1/completions` and `POST /v1/chat/completions` answer with text made
//! from the prompt (the "model" echoes its words in reverse order) and an OpenAI-style `usage`
//! object (`prompt_tokens`, `completion_tokens`, `total_tokens`; a token is a whitespace-separated
//! word), which the inference gateway meters. With `"stream": true` the answer is server-sent
//! events, one word per event, the last carrying `usage`, then `data: [DONE]`. `max_tokens`
//! caps the completion; `"delay_ms"` (non-standard) slows each token, to test streaming and
//! cold starts.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use serde_json::{Value, json};

/// The model's name in answers.
pub const MODEL: &str = "kiln-demo-reverse-1";

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// `/v1/completions`.
    #[serde(default)]
    pub prompt: Option<String>,
    /// `/v1/chat/completions`: the prompt is the messages' contents, joined.
    #[serde(default)]
    pub messages: Option<Vec<ChatMessage>>,
    #[serde(default)]
    pub max_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub delay_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    #[serde(default)]
    pub role: String,
    #[serde(default)]
    pub content: String,
}

/// Words of the prompt, and the completion's words (the prompt's in reverse, capped).
pub fn complete(prompt: &str, max_tokens: Option<usize>) -> (usize, Vec<String>) {
    let words: Vec<&str> = prompt.split_whitespace().collect();
    let cap = max_tokens.unwrap_or(256).min(4096);
    let out = words
        .iter()
        .rev()
        .take(cap)
        .map(|w| (*w).to_owned())
        .collect();
    (words.len(), out)
}

pub fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// The HTTP app.
pub fn app() -> Router {
    Router::new()
        .route("/health", get(|| async { "ok\n" }))
        .route(
            "/v1/models",
            get(|| async {
                Json(json!({"object": "list", "data": [{"id": MODEL, "object": "model"}]}))
            }),
        )
        .route("/v1/completions", post(|body| answer(body, false)))
        .route("/v1/chat/completions", post(|body| answer(body, true)))
}

async fn answer(
    body: Result<Json<CompletionRequest>, axum::extract::rejection::JsonRejection>,
    chat: bool,
) -> Response {
    let Ok(Json(req)) = body else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"message": "the body must be a JSON completion request", "type": "invalid_request_error"}})),
        )
            .into_response();
    };
    let prompt = match (&req.prompt, &req.messages) {
        (Some(p), _) => p.clone(),
        (None, Some(m)) => m
            .iter()
            .map(|m| m.content.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        (None, None) => String::new(),
    };
    let (prompt_tokens, words) = complete(&prompt, req.max_tokens);
    let delay = Duration::from_millis(req.delay_ms.unwrap_or(0).min(10_000));
    if req.stream {
        return Sse::new(stream_words(words, prompt_tokens, delay, chat)).into_response();
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay * words.len() as u32).await;
    }
    let text = words.join(" ");
    let choice = if chat {
        json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"})
    } else {
        json!({"index": 0, "text": text, "finish_reason": "stop"})
    };
    Json(json!({
        "id": "cmpl-demo",
        "object": if chat { "chat.completion" } else { "text_completion" },
        "model": MODEL,
        "choices": [choice],
        "usage": usage(prompt_tokens, words.len()),
    }))
    .into_response()
}

fn stream_words(
    words: Vec<String>,
    prompt_tokens: usize,
    delay: Duration,
    chat: bool,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let n = words.len();
    let chunks = stream::iter(words).then(move |w| async move {
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let choice = if chat {
            json!({"index": 0, "delta": {"content": format!("{w} ")}})
        } else {
            json!({"index": 0, "text": format!("{w} ")})
        };
        Ok(Event::default().data(json!({"model": MODEL, "choices": [choice]}).to_string()))
    });
    let tail = stream::iter([
        Ok(Event::default().data(
            json!({"model": MODEL, "choices": [], "usage": usage(prompt_tokens, n)}).to_string(),
        )),
        Ok(Event::default().data("[DONE]")),
    ]);
    chunks.chain(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_toy_model_reverses_words_and_counts_tokens() {
        let (p, words) = complete("the quick brown fox", Some(3));
        assert_eq!(p, 4);
        assert_eq!(words, ["fox", "brown", "quick"]);
        assert_eq!(usage(4, 3)["total_tokens"], 7);
    }
}
