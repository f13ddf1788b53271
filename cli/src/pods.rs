//! `kiln pods …`: GPU containers of the org.

use anyhow::{Result, bail};
use clap::Subcommand;
use serde_json::{Map, Value, json};

use crate::client::seg;
use crate::output::{self, Format, cell, when};
use crate::{Ctx, items};

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the `Create` variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum PodsCommand {
    /// List the org's pods, newest first.
    List,
    /// Create a pod; it starts pending until the scheduler places it.
    #[command(
        after_help = "Examples:\n  kiln pods create llm --image vllm/vllm-openai:v0.6.3 --gpu h100-80gb:2 --port 8000 \\\n      --secret-env HF_TOKEN -- --model meta-llama/Llama-3.1-8B\n  kiln pods create notebook --image jupyter/base-notebook --gpu h100-80gb:mig=3g.40gb\n  kiln pods create tiny --image app:1 --gpu h100-80gb:share=20 --cpu 0.5"
    )]
    Create {
        /// A lowercase DNS label (a-z, 0-9, '-'), up to 63 characters.
        name: String,
        /// The container image, `name[:tag][@sha256:…]`.
        #[arg(long)]
        image: String,
        /// The GPU: TYPE[:COUNT] for whole GPUs, TYPE:mig=PROFILE for a MIG slice, or
        /// TYPE:share=GIB for a time-sliced share. Omit for a CPU-only pod. See `kiln gpu-types`.
        #[arg(long, value_name = "SPEC")]
        gpu: Option<String>,
        /// CPU cores (fractions allowed) [server default: 1].
        #[arg(long)]
        cpu: Option<f64>,
        /// Memory in GiB [server default: 4].
        #[arg(long)]
        memory_gib: Option<i64>,
        /// Scratch disk in GiB [server default: 10].
        #[arg(long)]
        disk_gib: Option<i64>,
        /// An environment variable, KEY=VALUE (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// A secret environment variable, stored encrypted and never shown again: KEY=VALUE, or
        /// just KEY to take the value from your own environment (keeps it out of shell
        /// history). Repeatable.
        #[arg(long = "secret-env", value_name = "KEY[=VALUE]")]
        secret_env: Vec<String>,
        /// A container port to expose (repeatable).
        #[arg(long = "port", value_name = "PORT")]
        ports: Vec<i64>,
        /// Run on spot capacity (cheaper; may be preempted).
        #[arg(long)]
        spot: bool,
        /// When the main process exits: on-failure (restart up to 3 times), always, never
        /// [server default: on-failure].
        #[arg(long, value_name = "POLICY", value_parser = ["on-failure", "always", "never"])]
        restart: Option<String>,
        /// The command and its arguments, after `--` [default: the image's].
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// One pod: state and why, node, GPUs, ports, env (secrets hidden).
    Get {
        #[arg(value_name = "POD_ID")]
        id: String,
    },
    /// The pod's output (stdout and stderr): the last lines, or `-f` to follow it live until the
    /// pod ends. Lines the container wrote to stderr go to stderr.
    Logs {
        #[arg(value_name = "POD_ID")]
        id: String,
        /// Keep following new output until the pod ends (Ctrl-C to stop).
        #[arg(short, long)]
        follow: bool,
        /// How many recent lines to show first (0–5000).
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
    /// Delete a pod: it is stopped and its GPUs are freed at once.
    Delete {
        #[arg(value_name = "POD_ID")]
        id: String,
    },
}

pub async fn run(ctx: &mut Ctx, command: PodsCommand) -> Result<()> {
    match command {
        PodsCommand::List => list(ctx).await,
        PodsCommand::Create {
            name,
            image,
            gpu,
            cpu,
            memory_gib,
            disk_gib,
            env,
            secret_env,
            ports,
            spot,
            restart,
            command,
        } => {
            let mut body = json!({ "name": name, "image": image });
            if let Some(g) = gpu {
                body["gpu"] = parse_gpu(&g)?;
            }
            if let Some(c) = cpu {
                body["cpu"] = json!(c);
            }
            if let Some(m) = memory_gib {
                body["memory_gib"] = json!(m);
            }
            if let Some(d) = disk_gib {
                body["disk_gib"] = json!(d);
            }
            let env = parse_env(&env, &secret_env, |k| std::env::var(k).ok())?;
            if !env.is_empty() {
                body["env"] = Value::Object(env);
            }
            if !ports.is_empty() {
                body["ports"] = json!(ports);
            }
            if !command.is_empty() {
                body["command"] = json!(command);
            }
            if spot {
                body["spot"] = json!(true);
            }
            if let Some(r) = restart {
                body["restart_policy"] = json!(r.replace('-', "_"));
            }
            create(ctx, &body).await
        }
        PodsCommand::Get { id } => get(ctx, &id).await,
        PodsCommand::Logs { id, follow, tail } => logs(ctx, &id, follow, tail).await,
        PodsCommand::Delete { id } => delete(ctx, &id).await,
    }
}

/// Attempts to reconnect a dropped follow stream before giving up.
const FOLLOW_RETRIES: u32 = 5;

async fn logs(ctx: &mut Ctx, id: &str, follow: bool, tail: u32) -> Result<()> {
    use std::io::Write;
    let org = ctx.org().await?;
    let path = format!("/v1/orgs/{}/pods/{}/logs", seg(&org), seg(id));
    let mut query = vec![("tail", tail.to_string())];
    if !follow {
        let resp = ctx.client.open_stream(&path, &query, None).await?;
        let text = resp.text().await?;
        if ctx.format == Format::Json {
            for line in text.lines() {
                output::json(&json!({ "text": line }));
            }
        } else {
            print!("{text}");
        }
        return Ok(());
    }
    query.push(("follow", "true".into()));
    let mut last_id: Option<String> = None;
    let mut failures = 0;
    loop {
        let mut resp = match ctx
            .client
            .open_stream(&path, &query, last_id.as_deref())
            .await
        {
            Ok(r) => r,
            Err(e) if e.status().is_none() && failures < FOLLOW_RETRIES => {
                failures += 1;
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(failures))).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut events = SseParser::default();
        let ended = loop {
            match resp.chunk().await {
                Ok(Some(bytes)) => {
                    failures = 0;
                    for event in events.push(&String::from_utf8_lossy(&bytes)) {
                        if event.name != "log" {
                            continue;
                        }
                        if let Some(id) = event.id {
                            last_id = Some(id);
                        }
                        let line: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                        if ctx.format == Format::Json {
                            output::json(&line);
                        } else if line["source"] == "stderr" {
                            eprintln!("{}", cell(&line, "text"));
                        } else {
                            println!("{}", line["text"].as_str().unwrap_or_default());
                        }
                    }
                    let _ = std::io::stdout().flush();
                }
                Ok(None) => break true,
                Err(_) => break false,
            }
        };
        if ended {
            // The server ends the stream once the pod has ended and its last lines are out.
            return Ok(());
        }
        failures += 1;
        if failures > FOLLOW_RETRIES {
            bail!("lost the log stream {FOLLOW_RETRIES} times in a row; giving up");
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

/// One server-sent event.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    pub name: String,
    pub id: Option<String>,
    pub data: String,
}

/// Splits a server-sent-event stream into events as its text arrives in arbitrary chunks.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: String,
}

impl SseParser {
    pub fn push(&mut self, text: &str) -> Vec<SseEvent> {
        self.buf.push_str(&text.replace("\r\n", "\n"));
        let mut out = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let block: String = self.buf.drain(..end + 2).collect();
            let mut event = SseEvent {
                name: "message".into(),
                ..SseEvent::default()
            };
            let mut data: Vec<&str> = Vec::new();
            for line in block.lines() {
                if line.starts_with(':') {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => event.name = value.to_owned(),
                    "id" => event.id = Some(value.to_owned()),
                    "data" => data.push(value),
                    _ => {}
                }
            }
            if data.is_empty() && event.id.is_none() {
                continue; // a keep-alive comment
            }
            event.data = data.join("\n");
            out.push(event);
        }
        out
    }
}

/// `h100-80gb`, `h100-80gb:2`, `h100-80gb:mig=3g.40gb`, `h100-80gb:share=20` as the API's `gpu`.
pub fn parse_gpu(spec: &str) -> Result<Value> {
    let usage = "use TYPE[:COUNT], TYPE:mig=PROFILE or TYPE:share=GIB (e.g. h100-80gb:2)";
    let (gpu_type, rest) = match spec.split_once(':') {
        Some((t, r)) => (t.trim(), Some(r.trim())),
        None => (spec.trim(), None),
    };
    if gpu_type.is_empty() {
        bail!("--gpu {spec:?}: the GPU type is missing; {usage}");
    }
    Ok(match rest {
        None => json!({ "type": gpu_type, "count": 1 }),
        Some(r) => {
            if let Some(profile) = r.strip_prefix("mig=") {
                if profile.is_empty() {
                    bail!("--gpu {spec:?}: the MIG profile is missing; {usage}");
                }
                json!({ "type": gpu_type, "mig_profile": profile })
            } else if let Some(gib) = r.strip_prefix("share=") {
                let gib: i64 = gib
                    .trim_end_matches("gb")
                    .trim_end_matches("GiB")
                    .parse()
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "--gpu {spec:?}: share=GIB needs a whole number of GiB; {usage}"
                        )
                    })?;
                json!({ "type": gpu_type, "share": { "memory_gib": gib } })
            } else {
                let count: i64 = r
                    .parse()
                    .map_err(|_| anyhow::anyhow!("--gpu {spec:?}: {usage}"))?;
                json!({ "type": gpu_type, "count": count })
            }
        }
    })
}

/// `--env K=V` and `--secret-env K[=V]` as the API's `env` object.
pub fn parse_env(
    plain: &[String],
    secret: &[String],
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<Map<String, Value>> {
    let mut env = Map::new();
    for kv in plain {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {kv:?}: use KEY=VALUE");
        };
        if env.insert(k.to_owned(), json!(v)).is_some() {
            bail!("--env {k} is given more than once");
        }
    }
    for kv in secret {
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => match lookup(kv) {
                Some(v) => (kv.clone(), v),
                None => bail!(
                    "--secret-env {kv}: no `=VALUE` and no {kv} in your environment to take it from"
                ),
            },
        };
        if env
            .insert(k.clone(), json!({ "value": v, "secret": true }))
            .is_some()
        {
            bail!("--secret-env {k}: the variable is given more than once");
        }
    }
    Ok(env)
}

/// `2 × h100-80gb`, `h100-80gb mig 3g.40gb`, `h100-80gb share 20 GiB`, or `-`.
fn gpu_label(gpu: &Value) -> String {
    if gpu.is_null() {
        return "-".into();
    }
    let t = cell(gpu, "type");
    if let Some(p) = gpu.get("mig_profile").and_then(Value::as_str) {
        format!("{t} mig {p}")
    } else if let Some(s) = gpu.get("share").filter(|s| !s.is_null()) {
        format!("{t} share {} GiB", cell(s, "memory_gib"))
    } else {
        format!("{} × {t}", cell(gpu, "count"))
    }
}

fn state_label(p: &Value) -> String {
    let reason = cell(p, "state_reason");
    if reason == "-" {
        cell(p, "state")
    } else {
        format!("{} ({reason})", cell(p, "state"))
    }
}

async fn list(ctx: &mut Ctx) -> Result<()> {
    let org = ctx.org().await?;
    let list = ctx
        .client
        .list_all(&format!("/v1/orgs/{}/pods", seg(&org)))
        .await?;
    ctx.show(&list, |list| {
        output::table(
            &["ID", "NAME", "IMAGE", "GPU", "STATE", "NODE", "CREATED"],
            items(list).iter().map(|p| {
                vec![
                    cell(p, "id"),
                    cell(p, "name"),
                    cell(p, "image"),
                    gpu_label(&p["gpu"]),
                    cell(p, "state"),
                    cell(p, "node"),
                    when(p, "created_at"),
                ]
            }),
        );
    });
    Ok(())
}

async fn create(ctx: &mut Ctx, body: &Value) -> Result<()> {
    let org = ctx.org().await?;
    let p = ctx
        .client
        .create(&format!("/v1/orgs/{}/pods", seg(&org)), body)
        .await?;
    ctx.show(&p, |p| {
        println!(
            "Created pod {} ({}) in {org}: {}.",
            cell(p, "name"),
            cell(p, "id"),
            state_label(p)
        );
        println!("Follow it with `kiln pods get {}`.", cell(p, "id"));
    });
    Ok(())
}

async fn get(ctx: &mut Ctx, id: &str) -> Result<()> {
    let org = ctx.org().await?;
    let p = ctx
        .client
        .get(&format!("/v1/orgs/{}/pods/{}", seg(&org), seg(id)))
        .await?;
    ctx.show(&p, |p| {
        let gpus = p["gpus"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into());
        let env = p["env"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => format!("{k}={s}"),
                        _ => format!("{k}=<secret>"),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into());
        let ports = p["ports"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|port| match port["host_port"].as_i64() {
                        Some(hp) => format!(
                            "{} → {}:{hp}",
                            cell(port, "container_port"),
                            cell(port, "host")
                        ),
                        None => format!("{} (not bound yet)", cell(port, "container_port")),
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into());
        let command = p["command"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "(the image's)".into());
        output::fields(&[
            ("Pod", cell(p, "id")),
            ("Name", cell(p, "name")),
            ("Image", cell(p, "image")),
            ("State", state_label(p)),
            ("GPU", gpu_label(&p["gpu"])),
            ("Node", cell(p, "node")),
            ("GPUs held", gpus),
            (
                "Resources",
                format!(
                    "{} CPU, {} GiB memory, {} GiB disk{}",
                    cell(p, "cpu"),
                    cell(p, "memory_gib"),
                    cell(p, "disk_gib"),
                    if p["spot"].as_bool() == Some(true) {
                        ", spot"
                    } else {
                        ""
                    }
                ),
            ),
            ("Ports", ports),
            ("Env", env),
            ("Command", command),
            ("Created", when(p, "created_at")),
            ("Updated", when(p, "updated_at")),
        ]);
    });
    Ok(())
}

async fn delete(ctx: &mut Ctx, id: &str) -> Result<()> {
    let org = ctx.org().await?;
    let p = ctx
        .client
        .delete(&format!("/v1/orgs/{}/pods/{}", seg(&org), seg(id)))
        .await?;
    if ctx.format == Format::Json {
        output::json(&p);
    } else {
        println!(
            "Deleted pod {} ({id}): {}; its GPUs are free.",
            cell(&p, "name"),
            cell(&p, "state")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_specs() {
        assert_eq!(
            parse_gpu("h100-80gb").unwrap(),
            json!({"type": "h100-80gb", "count": 1})
        );
        assert_eq!(
            parse_gpu("h100-80gb:2").unwrap(),
            json!({"type": "h100-80gb", "count": 2})
        );
        assert_eq!(
            parse_gpu("h100-80gb:mig=3g.40gb").unwrap(),
            json!({"type": "h100-80gb", "mig_profile": "3g.40gb"})
        );
        assert_eq!(
            parse_gpu("h100-80gb:share=20").unwrap(),
            json!({"type": "h100-80gb", "share": {"memory_gib": 20}})
        );
        for bad in [":2", "h100-80gb:two", "h100-80gb:mig=", "h100-80gb:share=x"] {
            assert!(parse_gpu(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn server_sent_events_split_across_chunks() {
        let mut p = SseParser::default();
        assert!(p.push("event: log\nid: 1-0\ndata: {\"te").is_empty());
        let got = p.push("xt\":\"a\"}\n\n: keep-alive\n\nevent: log\r\ndata: b\r\n\r\n");
        assert_eq!(
            got,
            vec![
                SseEvent {
                    name: "log".into(),
                    id: Some("1-0".into()),
                    data: "{\"text\":\"a\"}".into()
                },
                SseEvent {
                    name: "log".into(),
                    id: None,
                    data: "b".into()
                },
            ]
        );
    }

    #[test]
    fn env_flags() {
        let env = parse_env(
            &["A=1".into(), "B=x=y".into()],
            &["S=s3cret".into(), "FROM_ENV".into()],
            |k| (k == "FROM_ENV").then(|| "looked-up".to_owned()),
        )
        .unwrap();
        assert_eq!(
            Value::Object(env),
            json!({"A": "1", "B": "x=y", "S": {"value": "s3cret", "secret": true},
                   "FROM_ENV": {"value": "looked-up", "secret": true}})
        );
        assert!(parse_env(&["NOEQUALS".into()], &[], |_| None).is_err());
        assert!(parse_env(&[], &["MISSING".into()], |_| None).is_err());
        assert!(parse_env(&["A=1".into()], &["A=2".into()], |_| None).is_err());
    }
}
