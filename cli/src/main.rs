//! `kiln`: the command-line client for the Kiln GPU cloud.

mod billing;
mod client;
mod config;
mod endpoints;
mod instances;
mod output;
mod pods;

use std::io::{BufRead, IsTerminal, Read, Write};
use std::process::ExitCode;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Parser, Subcommand};
use reqwest::Method;
use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::client::{Client, ClientError, TokenPair, seg};
use crate::config::{Config, Store};
use crate::output::{Format, cell, when};

const DEFAULT_API_URL: &str = "http://127.0.0.1:8080";

#[derive(Debug, Parser)]
#[command(
    name = "kiln",
    version,
    about = "Command-line client for Kiln, the multi-tenant GPU cloud"
)]
#[command(
    after_help = "Scripts can authenticate with an API key in KILN_API_KEY instead of `kiln login`."
)]
struct Cli {
    /// The Kiln API [default: the one you logged in to, else http://127.0.0.1:8080]
    #[arg(long, global = true, env = "KILN_API_URL", value_name = "URL")]
    api_url: Option<String>,

    /// How to print results.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Format::Table)]
    output: Format,

    /// The org to act on [default: the one set with `kiln orgs use`, else your personal org]
    #[arg(long, global = true, env = "KILN_ORG", value_name = "ORG_ID")]
    org: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Sign in and save the session.
    Login {
        /// Your email (prompted for when missing).
        #[arg(long)]
        email: Option<String>,
        /// Read the password from standard input (else KILN_PASSWORD, else a prompt).
        #[arg(long)]
        password_stdin: bool,
    },
    /// End the session and forget its tokens.
    Logout,
    /// Show who you are signed in as.
    Whoami,
    /// Your orgs [default: list].
    Orgs {
        #[command(subcommand)]
        command: Option<OrgsCommand>,
    },
    /// Members of the org [default: list].
    Members {
        #[command(subcommand)]
        command: Option<MembersCommand>,
    },
    /// API keys of the org [default: list].
    ApiKeys {
        #[command(subcommand)]
        command: Option<ApiKeysCommand>,
    },
    /// Instances: VMs of the org with whole GPUs, reached over SSH [default: list].
    Instances {
        #[command(subcommand)]
        command: Option<instances::InstancesCommand>,
    },
    /// The VM images instances boot from [default: list].
    Images {
        #[command(subcommand)]
        command: Option<instances::ImagesCommand>,
    },
    /// Pods: GPU containers of the org [default: list].
    Pods {
        #[command(subcommand)]
        command: Option<pods::PodsCommand>,
    },
    /// Endpoints: model servers of the org behind the gateway [default: list].
    Endpoints {
        #[command(subcommand)]
        command: Option<endpoints::EndpointsCommand>,
    },
    /// GPU types with their MIG profiles, prices and what is free of each right now.
    GpuTypes,
    /// The org's balance, usage, ledger and invoices [default: balance].
    Billing {
        #[command(subcommand)]
        command: Option<billing::BillingCommand>,
    },
    /// Operator commands (your account must be the deployment's operator).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Debug, Subcommand)]
enum AdminCommand {
    /// Mint a one-time bootstrap token for a node agent; printed this once.
    NodeToken {
        /// How long the token stays usable, in seconds (60 to 604800).
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u32,
        /// A note to recognise the token by (e.g. the host it is for).
        #[arg(long)]
        note: Option<String>,
    },
    /// The fleet's nodes [default: list].
    Nodes {
        #[command(subcommand)]
        command: Option<NodesCommand>,
    },
    /// GPU capacity per GPU type: present, schedulable, unhealthy.
    Capacity,
    /// Orgs' GPU quotas: the most GPUs of a type an org may hold at once, per product.
    Quotas {
        #[command(subcommand)]
        command: QuotasCommand,
    },
    /// The price catalog's versions [default: list].
    Prices {
        #[command(subcommand)]
        command: Option<billing::PricesCommand>,
    },
    /// Credit an org (idempotent on --reference).
    Credit {
        #[arg(value_name = "ORG")]
        org_id: String,
        /// In USD, e.g. 25 or 12.50.
        #[arg(value_name = "AMOUNT_USD")]
        amount: String,
        /// Your reference (invoice or transfer number): the same one credits once.
        #[arg(long)]
        reference: String,
    },
    /// Show or set an org's credit limit and monthly budget.
    Billing {
        #[arg(value_name = "ORG")]
        org_id: String,
        /// How far the balance may go below zero, in USD.
        #[arg(long)]
        credit_limit: Option<String>,
        /// Monthly budget for alerts, in USD, or `none`.
        #[arg(long)]
        budget: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum QuotasCommand {
    /// An org's quotas (a GPU type and product without one is unlimited).
    List {
        #[arg(value_name = "ORG")]
        org_id: String,
    },
    /// Set or replace an org's quota for one GPU type and product.
    Set {
        #[arg(value_name = "ORG")]
        org_id: String,
        /// The GPU type, e.g. h100-80gb (see `kiln gpu-types`).
        gpu_type: String,
        /// instance, pod or endpoint.
        product: String,
        /// The most GPUs the org may hold at once (0 to 100000; 0 allows none).
        max_gpus: u32,
    },
    /// Remove an org's quota for one GPU type and product: it is unlimited there again.
    Remove {
        #[arg(value_name = "ORG")]
        org_id: String,
        gpu_type: String,
        /// instance, pod or endpoint.
        product: String,
    },
}

#[derive(Debug, Subcommand)]
enum NodesCommand {
    /// List the nodes that have joined, with their GPUs at a glance.
    List,
    /// One node: its GPUs with health, utilisation, memory and what runs on each.
    Show {
        #[arg(value_name = "NODE_ID")]
        node: String,
    },
    /// Cordon a node: it keeps its work and takes no new work.
    Cordon {
        #[arg(value_name = "NODE_ID")]
        node: String,
    },
    /// Uncordon a node: it takes new work again (this also ends a drain).
    Uncordon {
        #[arg(value_name = "NODE_ID")]
        node: String,
    },
    /// Drain a node: no new work, and its work is moved or stopped.
    Drain {
        #[arg(value_name = "NODE_ID")]
        node: String,
    },
}

#[derive(Debug, Subcommand)]
enum OrgsCommand {
    /// List the orgs you belong to.
    List,
    /// Create an org; you become its owner.
    Create {
        /// A name for the org.
        name: String,
    },
    /// Make an org the default for later commands.
    Use {
        #[arg(value_name = "ORG_ID")]
        org: String,
    },
}

#[derive(Debug, Subcommand)]
enum MembersCommand {
    /// List the members.
    List,
    /// Add someone who has signed up.
    Add {
        /// The email they signed up with.
        email: String,
        /// owner, admin, member or viewer.
        #[arg(long, default_value = "member")]
        role: String,
    },
    /// Change a member's role.
    SetRole {
        #[arg(value_name = "USER_ID")]
        user: String,
        /// owner, admin, member or viewer.
        role: String,
    },
    /// Remove a member.
    Remove {
        #[arg(value_name = "USER_ID")]
        user: String,
    },
}

#[derive(Debug, Subcommand)]
enum ApiKeysCommand {
    /// List the keys (never their secrets).
    List,
    /// Create a key; its secret is printed this once.
    Create {
        /// A name to recognise the key by.
        name: String,
        /// The key's role, at most your own [default: member].
        #[arg(long)]
        role: Option<String>,
        /// When the key stops working (RFC 3339, e.g. 2030-01-01T00:00:00Z).
        #[arg(long, value_name = "RFC3339")]
        expires_at: Option<String>,
    },
    /// Revoke a key; it stops working at once.
    Revoke {
        #[arg(value_name = "KEY_ID")]
        key: String,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(&e);
            ExitCode::FAILURE
        }
    }
}

fn report(e: &anyhow::Error) {
    let mut stderr = std::io::stderr().lock();
    let _ = writeln!(stderr, "error: {e:#}");
    if let Some(hint) = e.downcast_ref::<ClientError>().and_then(ClientError::hint) {
        let _ = writeln!(stderr, "hint: {hint}");
    }
}

/// Everything a command needs.
struct Ctx {
    client: Client,
    store: Store,
    format: Format,
    org_flag: Option<String>,
}

async fn run(cli: Cli) -> Result<()> {
    let store = Store::locate()?;
    let saved = store.load()?;
    let api_url = cli
        .api_url
        .clone()
        .filter(|u| !u.trim().is_empty())
        .or_else(|| saved.api_url.clone())
        .unwrap_or_else(|| DEFAULT_API_URL.to_owned());
    if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
        bail!("the API URL must start with http:// or https:// (got {api_url:?})");
    }
    let api_key = std::env::var("KILN_API_KEY")
        .ok()
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty());
    let client = Client::new(&api_url, store.clone(), api_key)?;
    let org_flag = cli.org.clone().filter(|o| !o.trim().is_empty());
    let mut ctx = Ctx {
        client,
        store,
        format: cli.output,
        org_flag,
    };

    match cli.command {
        Command::Login {
            email,
            password_stdin,
        } => login(&mut ctx, email, password_stdin).await,
        Command::Logout => logout(&mut ctx).await,
        Command::Whoami => whoami(&mut ctx).await,
        Command::Orgs { command } => match command.unwrap_or(OrgsCommand::List) {
            OrgsCommand::List => orgs_list(&mut ctx).await,
            OrgsCommand::Create { name } => orgs_create(&mut ctx, &name).await,
            OrgsCommand::Use { org } => orgs_use(&mut ctx, &org).await,
        },
        Command::Members { command } => match command.unwrap_or(MembersCommand::List) {
            MembersCommand::List => members_list(&mut ctx).await,
            MembersCommand::Add { email, role } => members_add(&mut ctx, &email, &role).await,
            MembersCommand::SetRole { user, role } => {
                members_set_role(&mut ctx, &user, &role).await
            }
            MembersCommand::Remove { user } => members_remove(&mut ctx, &user).await,
        },
        Command::ApiKeys { command } => match command.unwrap_or(ApiKeysCommand::List) {
            ApiKeysCommand::List => keys_list(&mut ctx).await,
            ApiKeysCommand::Create {
                name,
                role,
                expires_at,
            } => keys_create(&mut ctx, &name, role, expires_at).await,
            ApiKeysCommand::Revoke { key } => keys_revoke(&mut ctx, &key).await,
        },
        Command::Instances { command } => {
            instances::run(
                &mut ctx,
                command.unwrap_or(instances::InstancesCommand::List),
            )
            .await
        }
        Command::Images { command } => {
            instances::images(&mut ctx, command.unwrap_or(instances::ImagesCommand::List)).await
        }
        Command::Pods { command } => {
            pods::run(&mut ctx, command.unwrap_or(pods::PodsCommand::List)).await
        }
        Command::Endpoints { command } => {
            endpoints::run(
                &mut ctx,
                command.unwrap_or(endpoints::EndpointsCommand::List),
            )
            .await
        }
        Command::GpuTypes => gpu_types(&mut ctx).await,
        Command::Billing { command } => {
            billing::run(
                &mut ctx,
                command.unwrap_or(billing::BillingCommand::Balance),
            )
            .await
        }
        Command::Admin { command } => match command {
            AdminCommand::NodeToken { ttl_secs, note } => {
                admin_node_token(&mut ctx, ttl_secs, note).await
            }
            AdminCommand::Nodes { command } => match command.unwrap_or(NodesCommand::List) {
                NodesCommand::List => admin_nodes(&mut ctx).await,
                NodesCommand::Show { node } => admin_node_show(&mut ctx, &node).await,
                NodesCommand::Cordon { node } => admin_node_set(&mut ctx, &node, "cordon").await,
                NodesCommand::Uncordon { node } => {
                    admin_node_set(&mut ctx, &node, "uncordon").await
                }
                NodesCommand::Drain { node } => admin_node_set(&mut ctx, &node, "drain").await,
            },
            AdminCommand::Capacity => admin_capacity(&mut ctx).await,
            AdminCommand::Prices { command } => {
                billing::prices(&mut ctx, command.unwrap_or(billing::PricesCommand::List)).await
            }
            AdminCommand::Credit {
                org_id,
                amount,
                reference,
            } => billing::credit(&mut ctx, &org_id, &amount, &reference).await,
            AdminCommand::Billing {
                org_id,
                credit_limit,
                budget,
            } => billing::settings(&mut ctx, &org_id, credit_limit, budget).await,
            AdminCommand::Quotas { command } => match command {
                QuotasCommand::List { org_id } => admin_quotas(&mut ctx, &org_id).await,
                QuotasCommand::Set {
                    org_id,
                    gpu_type,
                    product,
                    max_gpus,
                } => admin_quota_set(&mut ctx, &org_id, &gpu_type, &product, max_gpus).await,
                QuotasCommand::Remove {
                    org_id,
                    gpu_type,
                    product,
                } => admin_quota_remove(&mut ctx, &org_id, &gpu_type, &product).await,
            },
        },
    }
}

impl Ctx {
    /// The org to act on: `--org` / `KILN_ORG`, else (for a session) the saved default, else the
    /// API key's org or the user's personal org.
    async fn org(&mut self) -> Result<String> {
        if let Some(org) = &self.org_flag {
            return Ok(org.clone());
        }
        if !self.client.uses_api_key()
            && let Some(org) = self.store.load()?.org.filter(|o| !o.is_empty())
        {
            return Ok(org);
        }
        let me = self.client.get("/v1/me").await?;
        default_org(&me)
            .ok_or_else(|| anyhow!("you belong to no org: create one with `kiln orgs create NAME`"))
    }

    /// Print JSON as-is, or run `table` for people.
    fn show(&self, v: &Value, table: impl FnOnce(&Value)) {
        match self.format {
            Format::Json => output::json(v),
            Format::Table => table(v),
        }
    }
}

/// The org a `/v1/me` answer points at: the API key's, else the personal one, else the first.
fn default_org(me: &Value) -> Option<String> {
    if let Some(org) = me.pointer("/api_key/org_id").and_then(Value::as_str) {
        return Some(org.to_owned());
    }
    let memberships = me.get("memberships")?.as_array()?;
    memberships
        .iter()
        .find(|m| m.get("personal").and_then(Value::as_bool) == Some(true))
        .or_else(|| memberships.first())
        .and_then(|m| m.get("org_id")?.as_str())
        .map(str::to_owned)
}

/// A list answer's entries: `{items: [...]}`, or a bare array (`/v1/gpu-types`).
fn items(v: &Value) -> &[Value] {
    v.as_array()
        .or_else(|| v.get("items").and_then(Value::as_array))
        .map_or(&[], Vec::as_slice)
}

// ---- session ----

async fn login(ctx: &mut Ctx, email: Option<String>, password_stdin: bool) -> Result<()> {
    let email = match email.filter(|e| !e.trim().is_empty()) {
        Some(e) => e,
        None => prompt_email(password_stdin)?,
    };
    let password = read_password(password_stdin)?;
    let pair = ctx
        .client
        .anonymous(
            Method::POST,
            "/v1/auth/login",
            &json!({ "email": email.trim(), "password": password }),
        )
        .await?;
    let tokens =
        TokenPair::from_value(&pair).context("the API answered the login without tokens")?;
    let me = ctx
        .client
        .get_with_token("/v1/me", &tokens.access_token)
        .await?;
    let api_url = ctx.client.base().to_owned();

    let (previous, saved) = ctx.store.update(|config| {
        let previous = config.clone();
        let same_server = config
            .api_url
            .as_deref()
            .map(client::normalize_url)
            .as_deref()
            == Some(api_url.as_str());
        let keep_org = same_server
            && config.org.as_ref().is_some_and(|org| {
                me.get("memberships")
                    .and_then(Value::as_array)
                    .is_some_and(|ms| {
                        ms.iter()
                            .any(|m| m.get("org_id").and_then(Value::as_str) == Some(org))
                    })
            });
        *config = Config {
            api_url: Some(api_url.clone()),
            org: if keep_org {
                config.org.clone()
            } else {
                default_org(&me)
            },
            ..Config::default()
        };
        tokens.apply(config);
        previous
    })?;
    // Signing in again replaces the old session: end it rather than leave it alive.
    let same_server = previous
        .api_url
        .as_deref()
        .map(client::normalize_url)
        .as_deref()
        == Some(api_url.as_str());
    if let Some(old) = previous
        .refresh_token
        .filter(|old| same_server && Some(old) != saved.refresh_token.as_ref())
    {
        let _ = ctx
            .client
            .anonymous(
                Method::POST,
                "/v1/auth/logout",
                &json!({ "refresh_token": old }),
            )
            .await;
    }

    ctx.show(&me, |me| {
        let who = me
            .pointer("/user/email")
            .and_then(Value::as_str)
            .unwrap_or(&email);
        println!("Signed in to {api_url} as {who}.");
        if let Some(org) = &saved.org {
            println!("Default org: {}", org_label(me, org));
        }
        println!("Session saved in {}", ctx.store.path().display());
    });
    Ok(())
}

fn prompt_email(password_stdin: bool) -> Result<String> {
    if password_stdin || !std::io::stdin().is_terminal() {
        bail!("pass --email (standard input is not a terminal to ask on)");
    }
    eprint!("Email: ");
    std::io::stderr().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let email = line.trim().to_owned();
    if email.is_empty() {
        bail!("an email is required");
    }
    Ok(email)
}

fn read_password(from_stdin: bool) -> Result<String> {
    if from_stdin {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the password from standard input")?;
        let password = s
            .strip_suffix('\n')
            .map(|p| p.strip_suffix('\r').unwrap_or(p))
            .unwrap_or(&s)
            .to_owned();
        if password.is_empty() {
            bail!("no password on standard input");
        }
        return Ok(password);
    }
    if let Ok(p) = std::env::var("KILN_PASSWORD")
        && !p.is_empty()
    {
        return Ok(p);
    }
    rpassword::prompt_password("Password: ").map_err(|e| {
        anyhow!("cannot ask for the password ({e}): use --password-stdin or set KILN_PASSWORD")
    })
}

async fn logout(ctx: &mut Ctx) -> Result<()> {
    let config = ctx.store.load()?;
    if !config.has_session() {
        println!("Not signed in.");
        return Ok(());
    }
    let same_server = config
        .api_url
        .as_deref()
        .map(client::normalize_url)
        .as_deref()
        == Some(ctx.client.base());
    let mut warning = None;
    if let (Some(refresh), true) = (&config.refresh_token, same_server) {
        // Revoke by refresh token: works even when the access token has expired.
        match ctx
            .client
            .anonymous(
                Method::POST,
                "/v1/auth/logout",
                &json!({ "refresh_token": refresh }),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if e.status() == Some(401) => {} // already over
            Err(e) => warning = Some(e.to_string()),
        }
    }
    ctx.store.update(|c| {
        c.clear_session();
        c.org = None;
    })?;
    if let Some(w) = warning {
        eprintln!(
            "warning: the session could not be revoked on the server ({w}); it was forgotten here"
        );
    }
    println!("Signed out.");
    Ok(())
}

async fn whoami(ctx: &mut Ctx) -> Result<()> {
    let me = ctx.client.get("/v1/me").await?;
    let current = match &ctx.org_flag {
        Some(o) => Some(o.clone()),
        None if ctx.client.uses_api_key() => default_org(&me),
        None => ctx.store.load()?.org.or_else(|| default_org(&me)),
    };
    ctx.show(&me, |me| {
        let u = me.get("user").cloned().unwrap_or(Value::Null);
        let mut rows = vec![
            ("User", cell(&u, "email")),
            ("Name", cell(&u, "name")),
            ("ID", cell(&u, "id")),
        ];
        if u.get("is_operator").and_then(Value::as_bool) == Some(true) {
            rows.push(("Operator", "yes".into()));
        }
        if let Some(k) = me.get("api_key").filter(|k| !k.is_null()) {
            rows.push((
                "API key",
                format!(
                    "{} (role {} in {})",
                    cell(k, "id"),
                    cell(k, "role"),
                    cell(k, "org_id")
                ),
            ));
        }
        rows.push(("API", ctx.client.base().to_owned()));
        if let Some(org) = &current {
            rows.push(("Org", org_label(me, org)));
        }
        output::fields(&rows);
        let ms = me
            .get("memberships")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        if !ms.is_empty() {
            println!();
            output::table(
                &["", "ORG ID", "NAME", "ROLE", "PERSONAL"],
                ms.iter().map(|m| {
                    let mark = if current.as_deref() == m.get("org_id").and_then(Value::as_str) {
                        "*"
                    } else {
                        ""
                    };
                    vec![
                        mark.to_owned(),
                        cell(m, "org_id"),
                        cell(m, "org_name"),
                        cell(m, "role"),
                        cell(m, "personal"),
                    ]
                }),
            );
        }
    });
    Ok(())
}

/// `Name (org_…)` when the org is among the memberships, else the ID.
fn org_label(me: &Value, org: &str) -> String {
    me.get("memberships")
        .and_then(Value::as_array)
        .and_then(|ms| {
            ms.iter()
                .find(|m| m.get("org_id").and_then(Value::as_str) == Some(org))
        })
        .and_then(|m| m.get("org_name").and_then(Value::as_str))
        .map_or_else(|| org.to_owned(), |name| format!("{name} ({org})"))
}

// ---- orgs ----

async fn orgs_list(ctx: &mut Ctx) -> Result<()> {
    let list = ctx.client.list_all("/v1/orgs").await?;
    let current = match &ctx.org_flag {
        Some(o) => Some(o.clone()),
        None if ctx.client.uses_api_key() => None,
        None => ctx.store.load()?.org,
    };
    ctx.show(&list, |list| {
        let rows = items(list);
        let current = current.clone().or_else(|| {
            rows.iter()
                .find(|o| o.get("personal").and_then(Value::as_bool) == Some(true))
                .map(|o| cell(o, "id"))
        });
        output::table(
            &["", "ID", "NAME", "ROLE", "PERSONAL", "CREATED"],
            rows.iter().map(|o| {
                let mark = if current.as_deref() == o.get("id").and_then(Value::as_str) {
                    "*"
                } else {
                    ""
                };
                vec![
                    mark.to_owned(),
                    cell(o, "id"),
                    cell(o, "name"),
                    cell(o, "role"),
                    cell(o, "personal"),
                    when(o, "created_at"),
                ]
            }),
        );
    });
    Ok(())
}

async fn orgs_create(ctx: &mut Ctx, name: &str) -> Result<()> {
    let org = ctx
        .client
        .create("/v1/orgs", &json!({ "name": name }))
        .await?;
    ctx.show(&org, |o| {
        println!(
            "Created org {} ({}); you are its {}.",
            cell(o, "name"),
            cell(o, "id"),
            cell(o, "role")
        );
        println!("Make it your default with: kiln orgs use {}", cell(o, "id"));
    });
    Ok(())
}

async fn orgs_use(ctx: &mut Ctx, org: &str) -> Result<()> {
    // Check it exists and you belong to it before saving.
    let found = ctx.client.get(&format!("/v1/orgs/{}", seg(org))).await?;
    let id = found
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or(org)
        .to_owned();
    ctx.store.update(|c| c.org = Some(id.clone()))?;
    ctx.show(&found, |o| {
        println!(
            "Default org is now {} ({}).",
            cell(o, "name"),
            cell(o, "id")
        )
    });
    Ok(())
}

// ---- members ----

async fn members_list(ctx: &mut Ctx) -> Result<()> {
    let org = ctx.org().await?;
    let list = ctx
        .client
        .list_all(&format!("/v1/orgs/{}/members", seg(&org)))
        .await?;
    ctx.show(&list, |list| {
        output::table(
            &["USER ID", "EMAIL", "NAME", "ROLE", "JOINED"],
            items(list).iter().map(|m| {
                vec![
                    cell(m, "user_id"),
                    cell(m, "email"),
                    cell(m, "name"),
                    cell(m, "role"),
                    when(m, "joined_at"),
                ]
            }),
        );
    });
    Ok(())
}

async fn members_add(ctx: &mut Ctx, email: &str, role: &str) -> Result<()> {
    let org = ctx.org().await?;
    let m = ctx
        .client
        .create(
            &format!("/v1/orgs/{}/members", seg(&org)),
            &json!({ "email": email, "role": role }),
        )
        .await?;
    ctx.show(&m, |m| {
        println!(
            "Added {} ({}) to {org} as {}.",
            cell(m, "email"),
            cell(m, "user_id"),
            cell(m, "role")
        )
    });
    Ok(())
}

async fn members_set_role(ctx: &mut Ctx, user: &str, role: &str) -> Result<()> {
    let org = ctx.org().await?;
    let m = ctx
        .client
        .patch(
            &format!("/v1/orgs/{}/members/{}", seg(&org), seg(user)),
            &json!({ "role": role }),
        )
        .await?;
    ctx.show(&m, |m| {
        println!("{} is now {} in {org}.", cell(m, "email"), cell(m, "role"))
    });
    Ok(())
}

async fn members_remove(ctx: &mut Ctx, user: &str) -> Result<()> {
    let org = ctx.org().await?;
    ctx.client
        .delete(&format!("/v1/orgs/{}/members/{}", seg(&org), seg(user)))
        .await?;
    if ctx.format == Format::Table {
        println!("Removed {user} from {org}.");
    }
    Ok(())
}

// ---- API keys ----

async fn keys_list(ctx: &mut Ctx) -> Result<()> {
    let org = ctx.org().await?;
    let list = ctx
        .client
        .list_all(&format!("/v1/orgs/{}/api-keys", seg(&org)))
        .await?;
    let now = OffsetDateTime::now_utc();
    ctx.show(&list, |list| {
        output::table(
            &[
                "ID",
                "NAME",
                "PREFIX",
                "ROLE",
                "STATUS",
                "CREATED",
                "EXPIRES",
                "LAST USED",
            ],
            items(list).iter().map(|k| {
                vec![
                    cell(k, "id"),
                    cell(k, "name"),
                    cell(k, "prefix"),
                    cell(k, "role"),
                    key_status(k, now).to_owned(),
                    when(k, "created_at"),
                    when(k, "expires_at"),
                    when(k, "last_used_at"),
                ]
            }),
        );
    });
    Ok(())
}

fn key_status(k: &Value, now: OffsetDateTime) -> &'static str {
    let at = |f: &str| {
        k.get(f).and_then(Value::as_str).and_then(|s| {
            OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
        })
    };
    if k.get("revoked_at").is_some_and(|v| !v.is_null()) {
        "revoked"
    } else if at("expires_at").is_some_and(|t| t <= now) {
        "expired"
    } else {
        "active"
    }
}

async fn keys_create(
    ctx: &mut Ctx,
    name: &str,
    role: Option<String>,
    expires_at: Option<String>,
) -> Result<()> {
    let org = ctx.org().await?;
    let mut body = json!({ "name": name });
    if let Some(r) = role {
        body["role"] = json!(r);
    }
    if let Some(e) = expires_at {
        body["expires_at"] = json!(e);
    }
    let k = ctx
        .client
        .create(&format!("/v1/orgs/{}/api-keys", seg(&org)), &body)
        .await?;
    ctx.show(&k, |k| {
        let expires = k.get("expires_at").and_then(Value::as_str).map_or_else(|| "never expires".to_owned(), |e| format!("expires {}", output::human_time(e)));
        println!("Created API key {} ({}) in {org}: role {}, {expires}.", cell(k, "name"), cell(k, "id"), cell(k, "role"));
        println!();
        println!("    {}", cell(k, "key"));
        println!();
        println!("This secret is shown only this once: store it now. Use it as KILN_API_KEY or `Authorization: Bearer …`.");
    });
    Ok(())
}

async fn keys_revoke(ctx: &mut Ctx, key: &str) -> Result<()> {
    let org = ctx.org().await?;
    ctx.client
        .delete(&format!("/v1/orgs/{}/api-keys/{}", seg(&org), seg(key)))
        .await?;
    if ctx.format == Format::Table {
        println!("Revoked API key {key}; it stops working at once.");
    }
    Ok(())
}

async fn admin_node_token(ctx: &mut Ctx, ttl_secs: u32, note: Option<String>) -> Result<()> {
    let mut body = json!({ "ttl_secs": ttl_secs });
    if let Some(n) = note {
        body["note"] = json!(n);
    }
    let t = ctx.client.create("/v1/admin/node-tokens", &body).await?;
    ctx.show(&t, |t| {
        println!(
            "Bootstrap token {} expires {}:",
            cell(t, "id"),
            output::human_time(&cell(t, "expires_at"))
        );
        println!();
        println!("    {}", cell(t, "token"));
        println!();
        println!(
            "It works once: give it to one node agent to join with. It is shown only this once."
        );
    });
    Ok(())
}

async fn admin_nodes(ctx: &mut Ctx) -> Result<()> {
    let list = ctx.client.list_all("/v1/admin/nodes").await?;
    ctx.show(&list, |list| {
        let rows = items(list).iter().map(|n| {
            let s = &n["gpu_summary"];
            vec![
                cell(n, "id"),
                cell(n, "hostname"),
                cell(n, "state"),
                gpu_count(s),
                format!(
                    "{}/{}/{}",
                    cell(s, "healthy"),
                    cell(s, "degraded"),
                    cell(s, "unhealthy")
                ),
                cell(s, "allocated"),
                s["mean_sm_util_pct"]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |u| format!("{u:.0}%")),
                cell(n, "agent_version"),
                when(n, "last_heartbeat_at"),
            ]
        });
        output::table(
            &[
                "ID",
                "HOSTNAME",
                "STATE",
                "GPUS",
                "OK/DEGRADED/BAD",
                "ALLOCATED",
                "SM UTIL",
                "AGENT",
                "LAST HEARTBEAT",
            ],
            rows,
        );
    });
    Ok(())
}

/// "8 × h100-80gb" (or "-" without GPUs).
fn gpu_count(summary: &Value) -> String {
    let count = summary["count"].as_i64().unwrap_or(0);
    if count == 0 {
        return "-".to_owned();
    }
    let types: Vec<&str> = summary["gpu_types"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    format!("{count} × {}", types.join(", "))
}

async fn admin_node_show(ctx: &mut Ctx, node: &str) -> Result<()> {
    let n = ctx
        .client
        .get(&format!("/v1/admin/nodes/{}", seg(node)))
        .await?;
    ctx.show(&n, |n| {
        output::fields(&[
            ("Node", cell(n, "id")),
            ("Hostname", cell(n, "hostname")),
            (
                "State",
                format!(
                    "{} (admin {}, {})",
                    cell(n, "state"),
                    cell(n, "admin_state"),
                    cell(n, "liveness")
                ),
            ),
            (
                "Versions",
                format!(
                    "agent {}, driver {}, CUDA {}",
                    cell(n, "agent_version"),
                    cell(n, "driver_version"),
                    cell(n, "cuda_version")
                ),
            ),
            (
                "Host",
                format!(
                    "{} CPUs, {} GiB memory, {} GiB disk",
                    cell(n, "cpu_cores"),
                    n["memory_mib"].as_i64().unwrap_or(0) / 1024,
                    cell(n, "disk_gib")
                ),
            ),
            ("Joined", when(n, "joined_at")),
            ("Last heartbeat", when(n, "last_heartbeat_at")),
            (
                "Revisions",
                format!(
                    "{} applied of {}",
                    cell(n, "applied_revision"),
                    cell(n, "assignment_revision")
                ),
            ),
            ("GPUs", gpu_count(&n["gpu_summary"])),
        ]);
        let gpus = n["gpus"].as_array().map(Vec::as_slice).unwrap_or_default();
        if !gpus.is_empty() {
            println!();
            output::table(
                &[
                    "IDX", "UUID", "TYPE", "HEALTH", "SM", "MEMORY", "TEMP", "POWER", "MIG",
                    "RUNNING",
                ],
                gpus.iter().map(gpu_row),
            );
        }
        let events = n["gpu_events"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default();
        if !events.is_empty() {
            println!();
            output::table(
                &["WHEN", "GPU", "KIND", "MESSAGE"],
                events.iter().map(|e| {
                    vec![
                        when(e, "at"),
                        cell(e, "gpu_uuid"),
                        match e["code"].as_i64() {
                            Some(code) => format!("{} {code}", cell(e, "kind")),
                            None => cell(e, "kind"),
                        },
                        cell(e, "message"),
                    ]
                }),
            );
        }
    });
    Ok(())
}

fn gpu_row(g: &Value) -> Vec<String> {
    let pct = |k: &str| {
        g[k].as_i64()
            .map_or_else(|| "-".to_owned(), |v| format!("{v}%"))
    };
    let health = match g["health_reason"].as_str() {
        Some(r) if !r.is_empty() => format!("{} ({r})", cell(g, "health")),
        _ => cell(g, "health"),
    };
    let total = g["memory_mib"].as_i64().unwrap_or(0);
    let memory = match g["memory_used_mib"].as_i64() {
        Some(used) => format!("{} / {} MiB", used, total),
        None => format!("{total} MiB"),
    };
    let mig = g["mig_instances"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    format!(
                        "{}@{}{}",
                        cell(m, "profile"),
                        cell(m, "start"),
                        if m["allocated"].as_bool() == Some(true) {
                            "*"
                        } else {
                            ""
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".to_owned());
    let running = g["assignments"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|w| {
                    format!(
                        "{} {} ({})",
                        cell(w, "kind"),
                        cell(w, "id"),
                        cell(w, "state")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "-".to_owned());
    vec![
        cell(g, "index"),
        cell(g, "uuid"),
        g["gpu_type"]
            .as_str()
            .map_or_else(|| cell(g, "model"), str::to_owned),
        health,
        pct("sm_util_pct"),
        memory,
        g["temperature_c"]
            .as_i64()
            .map_or_else(|| "-".to_owned(), |t| format!("{t}C")),
        g["power_w"]
            .as_f64()
            .map_or_else(|| "-".to_owned(), |p| format!("{p:.0}W")),
        mig,
        running,
    ]
}

async fn admin_node_set(ctx: &mut Ctx, node: &str, action: &str) -> Result<()> {
    let n = ctx
        .client
        .post(
            &format!("/v1/admin/nodes/{}/{action}", seg(node)),
            &json!({}),
        )
        .await?;
    ctx.show(&n, |n| {
        let done = match action {
            "cordon" => "Cordoned",
            "uncordon" => "Uncordoned",
            _ => "Draining",
        };
        println!(
            "{done} {} ({}): state {}.",
            cell(n, "hostname"),
            cell(n, "id"),
            cell(n, "state")
        );
    });
    Ok(())
}

async fn gpu_types(ctx: &mut Ctx) -> Result<()> {
    let list = ctx.client.get("/v1/gpu-types").await?;
    ctx.show(&list, |list| {
        output::table(
            &[
                "GPU TYPE",
                "NAME",
                "MEMORY",
                "FREE",
                "TOTAL",
                "UNHEALTHY",
                "SHARES",
                "MIG FREE",
            ],
            items(list).iter().map(|t| {
                let a = t.get("available").unwrap_or(&Value::Null);
                vec![
                    cell(t, "id"),
                    cell(t, "name"),
                    format!("{} GiB", cell(t, "memory_gib")),
                    cell(a, "whole"),
                    cell(a, "total"),
                    cell(a, "unhealthy"),
                    shares_free(a.get("shares").unwrap_or(&Value::Null)),
                    mig_free(a.get("mig").unwrap_or(&Value::Null)),
                ]
            }),
        );
    });
    Ok(())
}

/// `2 (≤ 79 GiB)`: GPUs that take another share and the largest share that fits.
fn shares_free(s: &Value) -> String {
    match s.get("gpus").and_then(Value::as_i64) {
        Some(0) | None => "-".into(),
        Some(n) => format!("{n} (≤ {} GiB)", cell(s, "max_memory_gib")),
    }
}

/// `1g.10gb:4 3g.40gb:1`: MIG profiles that still fit, each with how many more would.
fn mig_free(m: &Value) -> String {
    let free: Vec<String> = m
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_i64().unwrap_or(0) > 0)
        .map(|(p, n)| format!("{p}:{n}"))
        .collect();
    if free.is_empty() {
        "-".into()
    } else {
        free.join(" ")
    }
}

async fn admin_capacity(ctx: &mut Ctx) -> Result<()> {
    let c = ctx.client.get("/v1/admin/capacity").await?;
    ctx.show(&c, |c| {
        output::table(
            &["GPU TYPE", "PRESENT", "SCHEDULABLE", "UNHEALTHY"],
            items(c).iter().map(|r| {
                vec![
                    cell(r, "gpu_type"),
                    cell(r, "total"),
                    cell(r, "schedulable"),
                    cell(r, "unhealthy"),
                ]
            }),
        );
    });
    Ok(())
}

async fn admin_quotas(ctx: &mut Ctx, org: &str) -> Result<()> {
    let list = ctx
        .client
        .get(&format!("/v1/admin/orgs/{}/quotas", seg(org)))
        .await?;
    ctx.show(&list, |list| {
        if items(list).is_empty() {
            println!("{org} has no quotas: it may use any number of GPUs of every type.");
            return;
        }
        output::table(
            &["GPU TYPE", "PRODUCT", "MAX GPUS", "UPDATED"],
            items(list).iter().map(|q| {
                vec![
                    cell(q, "gpu_type"),
                    cell(q, "product"),
                    cell(q, "max_gpus"),
                    when(q, "updated_at"),
                ]
            }),
        );
    });
    Ok(())
}

async fn admin_quota_set(
    ctx: &mut Ctx,
    org: &str,
    gpu_type: &str,
    product: &str,
    max_gpus: u32,
) -> Result<()> {
    let body = json!({ "gpu_type": gpu_type, "product": product, "max_gpus": max_gpus });
    let q = ctx
        .client
        .put(&format!("/v1/admin/orgs/{}/quotas", seg(org)), &body)
        .await?;
    ctx.show(&q, |q| {
        println!(
            "{org} may now hold at most {} {} GPUs for {}s.",
            cell(q, "max_gpus"),
            cell(q, "gpu_type"),
            cell(q, "product")
        );
    });
    Ok(())
}

async fn admin_quota_remove(ctx: &mut Ctx, org: &str, gpu_type: &str, product: &str) -> Result<()> {
    ctx.client
        .delete(&format!(
            "/v1/admin/orgs/{}/quotas/{}/{}",
            seg(org),
            seg(gpu_type),
            seg(product)
        ))
        .await?;
    if ctx.format == Format::Table {
        println!("Removed {org}'s quota for {gpu_type} {product}s: it is unlimited there now.");
    }
    Ok(())
}
