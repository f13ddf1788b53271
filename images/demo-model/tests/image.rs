//! The demo model image as the local stack builds it (`scripts/build-images.sh`): a static
//! binary in a FROM-scratch image that serves completions with `usage`, plain and streamed.

use std::process::Command;
use std::time::{Duration, Instant};

/// A running container, removed on drop.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test]
async fn the_demo_model_image_serves_completions_with_usage() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let out = Command::new(format!("{root}/scripts/build-images.sh"))
        .output()
        .expect("run scripts/build-images.sh");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let image = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(image, "kiln/demo-model:1");

    let name = format!("kiln-demo-model-test-{}", std::process::id());
    let _ = Command::new("docker").args(["rm", "-f", &name]).output();
    let id = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "-p",
        "127.0.0.1::8000",
        &image,
    ]);
    let _container = Container(id);
    let port = docker(&["port", &name, "8000/tcp"]);
    let addr = port.lines().next().unwrap().to_owned();
    let base = format!("http://{addr}");

    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = http.get(format!("{base}/health")).send().await
            && r.status().is_success()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the container did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let v: serde_json::Value = http
        .post(format!("{base}/v1/completions"))
        .json(&serde_json::json!({"prompt": "one two three four", "max_tokens": 2}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["choices"][0]["text"], "four three");
    assert_eq!(v["usage"]["prompt_tokens"], 4);
    assert_eq!(v["usage"]["completion_tokens"], 2);

    let streamed = http
        .post(format!("{base}/v1/chat/completions"))
        .json(
            &serde_json::json!({"messages": [{"role": "user", "content": "a b"}], "stream": true}),
        )
        .send()
        .await
        .unwrap();
    assert!(
        streamed.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = streamed.text().await.unwrap();
    assert!(body.contains("\"completion_tokens\":2"), "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
}
