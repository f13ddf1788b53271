//! `kiln-demo-model`: serve the toy model on `$PORT` (default 8000) on all addresses.

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(8000);
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    eprintln!(
        "kiln-demo-model serving {} on :{port}",
        kiln_demo_model::MODEL
    );
    // A line from the pod's own environment, so a newcomer sees env reach the container.
    if let Ok(banner) = std::env::var("BANNER") {
        println!("banner: {banner}");
    }
    let shutdown = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        }
    };
    let app = kiln_demo_model::app().layer(axum::middleware::from_fn(access_log));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

/// One stdout line per request: what `kiln pods logs` shows.
async fn access_log(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let line = format!("{} {}", request.method(), request.uri().path());
    let response = next.run(request).await;
    println!("{line} {}", response.status().as_u16());
    response
}
