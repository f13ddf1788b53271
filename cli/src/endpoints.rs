//! `kiln endpoints …`: model servers of the org, called through the gateway.

use anyhow::Result;
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::seg;
use crate::output::{self, Format, cell, when};
use crate::pods::{parse_env, parse_gpu};
use crate::{Ctx, items};

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the `Create` variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum EndpointsCommand {
    /// List the org's endpoints, newest first.
    List,
    /// Deploy a model server; call it at the URL shown, with an API key of the org.
    #[command(
        after_help = "Example:\n  kiln endpoints create llm --image $KILN_DEMO_IMAGE --gpu h100-80gb:1 --port 8000\n  curl -H \"Authorization: Bearer $KILN_API_KEY\" <url>/v1/completions -d '{\"prompt\": \"hello\"}'"
    )]
    Create {
        /// A lowercase DNS label, unique among the org's endpoints.
        name: String,
        /// The model server's image.
        #[arg(long)]
        image: String,
        /// Each replica's GPU, as for pods: TYPE[:COUNT], TYPE:mig=PROFILE, TYPE:share=GIB.
        #[arg(long, value_name = "SPEC")]
        gpu: Option<String>,
        /// The port the server listens on.
        #[arg(long)]
        port: i64,
        /// A path answering 200 when a replica is ready [server default: /].
        #[arg(long)]
        health_path: Option<String>,
        /// Replicas kept at least (0: scale to zero) [server default: 1].
        #[arg(long)]
        min_replicas: Option<i64>,
        /// Replicas at most [server default: max(min, 1)].
        #[arg(long)]
        max_replicas: Option<i64>,
        /// An environment variable, KEY=VALUE (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// A secret environment variable, KEY=VALUE or KEY (from your environment).
        #[arg(long = "secret-env", value_name = "KEY[=VALUE]")]
        secret_env: Vec<String>,
        /// Requests per second each API key may make [server default: 50].
        #[arg(long, value_name = "RATE")]
        key_rps: Option<f64>,
        /// Requests a key may make at once after a quiet spell [server default: twice the rate].
        #[arg(long, value_name = "N")]
        key_burst: Option<i64>,
        /// Calls each API key may have in flight [server default: 32].
        #[arg(long, value_name = "N")]
        key_concurrency: Option<i64>,
        /// Requests per second for the endpoint in total [server default: unlimited].
        #[arg(long, value_name = "RATE")]
        total_rps: Option<f64>,
        /// Calls in flight for the endpoint in total [server default: unlimited].
        #[arg(long, value_name = "N")]
        total_concurrency: Option<i64>,
        #[command(flatten)]
        price: PriceArgs,
    },
    /// Set what orgs you grant the endpoint pay you per call, or `--free` to remove the price.
    Price {
        #[arg(value_name = "ENDPOINT_ID")]
        id: String,
        #[command(flatten)]
        price: PriceArgs,
        /// Remove the price: granted orgs call it free of any charge of yours.
        #[arg(long, conflicts_with_all = ["per_request_micros", "per_1k_prompt_micros", "per_1k_completion_micros"])]
        free: bool,
    },
    /// Let another org's API keys call the endpoint (billed to it at the endpoint's price,
    /// paid to you).
    Grant {
        #[arg(value_name = "ENDPOINT_ID")]
        id: String,
        /// The org to grant, `org_…`.
        #[arg(value_name = "ORG_ID")]
        grantee: String,
    },
    /// Take a grant back: that org's keys get 404 at once.
    Revoke {
        #[arg(value_name = "ENDPOINT_ID")]
        id: String,
        #[arg(value_name = "ORG_ID")]
        grantee: String,
    },
    /// The orgs an endpoint is granted to.
    Grants {
        #[arg(value_name = "ENDPOINT_ID")]
        id: String,
    },
    /// Other orgs' endpoints your org may call, with their URL and price.
    Granted,
    /// One endpoint: URL, state and replicas.
    Get {
        #[arg(value_name = "ENDPOINT_ID")]
        id: String,
    },
    /// Delete an endpoint: calls stop at once, its replicas are terminated.
    Delete {
        #[arg(value_name = "ENDPOINT_ID")]
        id: String,
    },
}

/// An endpoint's price for the orgs it is granted to, in micro-USD.
#[derive(Debug, Default, clap::Args)]
pub struct PriceArgs {
    /// Per answered call, in micro-USD (granted orgs pay you this).
    #[arg(long, value_name = "MICROS")]
    per_request_micros: Option<i64>,
    /// Per 1,000 prompt tokens, in micro-USD.
    #[arg(long, value_name = "MICROS")]
    per_1k_prompt_micros: Option<i64>,
    /// Per 1,000 completion tokens, in micro-USD.
    #[arg(long, value_name = "MICROS")]
    per_1k_completion_micros: Option<i64>,
}

impl PriceArgs {
    /// The API's price object, or `None` when no part was given.
    fn body(&self) -> Option<Value> {
        let parts = [
            ("per_request_micros", self.per_request_micros),
            ("per_1k_prompt_tokens_micros", self.per_1k_prompt_micros),
            (
                "per_1k_completion_tokens_micros",
                self.per_1k_completion_micros,
            ),
        ];
        let price: serde_json::Map<String, Value> = parts
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_owned(), json!(v?))))
            .collect();
        (!price.is_empty()).then_some(Value::Object(price))
    }
}

/// `2000 µ$/call, 0 µ$/1k prompt, 0 µ$/1k completion tokens`, or `none`.
fn price(p: &Value) -> String {
    if p.is_null() {
        return "none (granted orgs call free)".to_owned();
    }
    format!(
        "{} µ$/call, {} µ$/1k prompt, {} µ$/1k completion tokens",
        cell(p, "per_request_micros"),
        cell(p, "per_1k_prompt_tokens_micros"),
        cell(p, "per_1k_completion_tokens_micros")
    )
}

pub async fn run(ctx: &mut Ctx, command: EndpointsCommand) -> Result<()> {
    let org = ctx.org().await?;
    let base = format!("/v1/orgs/{}/endpoints", seg(&org));
    match command {
        EndpointsCommand::List => {
            let list = ctx.client.list_all(&base).await?;
            ctx.show(&list, |list| {
                output::table(
                    &["ID", "NAME", "STATE", "REPLICAS", "URL", "CREATED"],
                    items(list).iter().map(|e| {
                        vec![
                            cell(e, "id"),
                            cell(e, "name"),
                            cell(e, "state"),
                            replicas(e),
                            cell(e, "url"),
                            when(e, "created_at"),
                        ]
                    }),
                );
            });
        }
        EndpointsCommand::Create {
            name,
            image,
            gpu,
            port,
            health_path,
            min_replicas,
            max_replicas,
            env,
            secret_env,
            key_rps,
            key_burst,
            key_concurrency,
            total_rps,
            total_concurrency,
            price,
        } => {
            let mut body = json!({ "name": name, "image": image, "port": port });
            if let Some(g) = gpu {
                body["gpu"] = parse_gpu(&g)?;
            }
            if let Some(h) = health_path {
                body["health_path"] = json!(h);
            }
            if let Some(n) = min_replicas {
                body["min_replicas"] = json!(n);
            }
            if let Some(n) = max_replicas {
                body["max_replicas"] = json!(n);
            }
            let env = parse_env(&env, &secret_env, |k| std::env::var(k).ok())?;
            if !env.is_empty() {
                body["env"] = Value::Object(env);
            }
            let fields = |pairs: [(&str, Option<Value>); 3]| -> serde_json::Map<String, Value> {
                pairs
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.to_owned(), v?)))
                    .collect()
            };
            let per_key = fields([
                ("requests_per_second", key_rps.map(|r| json!(r))),
                ("burst", key_burst.map(|n| json!(n))),
                ("concurrent", key_concurrency.map(|n| json!(n))),
            ]);
            let total = fields([
                ("requests_per_second", total_rps.map(|r| json!(r))),
                ("concurrent", total_concurrency.map(|n| json!(n))),
                ("burst", None),
            ]);
            if !per_key.is_empty() || !total.is_empty() {
                body["limits"] = json!({"per_key": per_key, "total": total});
            }
            if let Some(p) = price.body() {
                body["price"] = p;
            }
            let e = ctx.client.create(&base, &body).await?;
            ctx.show(&e, |e| {
                println!(
                    "Created endpoint {} ({}): {}.",
                    cell(e, "name"),
                    cell(e, "id"),
                    cell(e, "state")
                );
                println!("Call it at {} with an API key of the org.", cell(e, "url"));
            });
        }
        EndpointsCommand::Get { id } => {
            let e = ctx.client.get(&format!("{base}/{}", seg(&id))).await?;
            ctx.show(&e, |e| {
                output::fields(&[
                    ("Endpoint", cell(e, "id")),
                    ("Name", cell(e, "name")),
                    ("URL", cell(e, "url")),
                    ("State", cell(e, "state")),
                    ("Image", cell(e, "image")),
                    ("Port", cell(e, "port")),
                    ("Replicas", replicas(e)),
                    ("Limits", limits(e)),
                    ("Price", price(&e["price"])),
                    ("Created", when(e, "created_at")),
                ]);
            });
        }
        EndpointsCommand::Price { id, price: p, free } => {
            let path = format!("{base}/{}/price", seg(&id));
            let e = match (free, p.body()) {
                (true, _) => ctx.client.delete(&path).await?,
                (false, Some(body)) => ctx.client.put(&path, &body).await?,
                (false, None) => anyhow::bail!(
                    "give --per-request-micros, --per-1k-prompt-micros or --per-1k-completion-micros, or --free"
                ),
            };
            ctx.show(&e, |e| {
                println!(
                    "Price of {} ({id}): {}.",
                    cell(e, "name"),
                    price(&e["price"])
                );
            });
        }
        EndpointsCommand::Grant { id, grantee } => {
            let g = ctx
                .client
                .create(
                    &format!("{base}/{}/grants", seg(&id)),
                    &json!({ "org": grantee }),
                )
                .await?;
            ctx.show(&g, |g| {
                println!(
                    "Granted {} to {} ({}): its API keys may call it now.",
                    cell(g, "endpoint"),
                    cell(g, "org_name"),
                    cell(g, "org")
                );
            });
        }
        EndpointsCommand::Revoke { id, grantee } => {
            ctx.client
                .delete(&format!("{base}/{}/grants/{}", seg(&id), seg(&grantee)))
                .await?;
            if ctx.format != Format::Json {
                println!("Revoked {grantee}'s grant of {id}.");
            }
        }
        EndpointsCommand::Grants { id } => {
            let list = ctx
                .client
                .get(&format!("{base}/{}/grants", seg(&id)))
                .await?;
            ctx.show(&list, |list| {
                output::table(
                    &["ORG", "NAME", "GRANTED"],
                    items(list)
                        .iter()
                        .map(|g| vec![cell(g, "org"), cell(g, "org_name"), when(g, "created_at")]),
                );
            });
        }
        EndpointsCommand::Granted => {
            let list = ctx
                .client
                .get(&format!("/v1/orgs/{}/granted-endpoints", seg(&org)))
                .await?;
            ctx.show(&list, |list| {
                output::table(
                    &["ID", "NAME", "OWNER", "PRICE", "URL"],
                    items(list).iter().map(|e| {
                        vec![
                            cell(e, "id"),
                            cell(e, "name"),
                            cell(e, "owner_org_name"),
                            price(&e["price"]),
                            cell(e, "url"),
                        ]
                    }),
                );
            });
        }
        EndpointsCommand::Delete { id } => {
            let e = ctx.client.delete(&format!("{base}/{}", seg(&id))).await?;
            if ctx.format == Format::Json {
                output::json(&e);
            } else {
                println!("Deleted endpoint {} ({id}).", cell(&e, "name"));
            }
        }
    }
    Ok(())
}

/// `per key 50/s (burst 100), 32 in flight; total unlimited`.
fn limits(e: &Value) -> String {
    let one = |l: &Value| {
        let rate = match (l["requests_per_second"].as_f64(), l["burst"].as_i64()) {
            (Some(r), Some(b)) => format!("{r}/s (burst {b})"),
            _ => "any rate".to_owned(),
        };
        match l["concurrent"].as_i64() {
            Some(n) => format!("{rate}, {n} in flight"),
            None => rate,
        }
    };
    let l = &e["limits"];
    let total = if l["total"].is_null() {
        "unlimited".to_owned()
    } else {
        one(&l["total"])
    };
    format!("per key {}; total {total}", one(&l["per_key"]))
}

/// `1 running / 1 of 1..2`: live replicas by state, then desired of min..max.
fn replicas(e: &Value) -> String {
    let list = e["replicas"].as_array().cloned().unwrap_or_default();
    let running = list.iter().filter(|r| r["state"] == "running").count();
    format!(
        "{running} running / {} of {}..{}",
        cell(e, "desired_replicas"),
        cell(e, "min_replicas"),
        cell(e, "max_replicas")
    )
}
