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
    let shutdown = async {
        if let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        {
            tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        }
    };
    axum::serve(listener, kiln_demo_model::app())
        .with_graceful_shutdown(shutdown)
        .await
}
