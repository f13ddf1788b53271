//! `kiln instances …`: the org's VMs with whole GPUs passed through, reached over SSH; and
//! `kiln images`, the catalog they boot from.
//!
//! Instances are named by ID (`ins_…`) or by name: a name means the org's one live (not
//! terminated) instance of that name, else its newest one.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Subcommand;
use serde_json::{Value, json};

use crate::client::seg;
use crate::output::{self, Format, cell, when};
use crate::{Ctx, items};

#[derive(Debug, Subcommand)]
// Parsed once per process: the size of the `Create` variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum InstancesCommand {
    /// List the org's instances, newest first.
    List,
    /// Create an instance: a VM of a catalog image (`kiln images`) with whole GPUs and your SSH
    /// keys; it starts pending until the scheduler places it.
    #[command(
        after_help = "Example:\n  kiln instances create --name trainer --gpu-type h100-80gb --gpus 2 --image kiln-tiny \\\n      --ssh-key-file ~/.ssh/id_ed25519.pub\n  kiln instances ssh trainer"
    )]
    Create {
        /// A lowercase DNS label (a-z, 0-9, '-'), up to 63 characters; also the guest's hostname.
        #[arg(long)]
        name: String,
        /// The GPU type, e.g. h100-80gb (see `kiln gpu-types`).
        #[arg(long)]
        gpu_type: String,
        /// Whole GPUs passed through to the VM, 1–8.
        #[arg(long, default_value_t = 1)]
        gpus: i64,
        /// The catalog image to boot (see `kiln images`).
        #[arg(long)]
        image: String,
        /// An OpenSSH public key file, e.g. ~/.ssh/id_ed25519.pub; every key line in it is
        /// installed (repeatable).
        #[arg(long = "ssh-key-file", value_name = "PATH")]
        ssh_key_files: Vec<PathBuf>,
        /// An OpenSSH public key itself, `ssh-ed25519 AAAA… comment` (repeatable).
        #[arg(long = "ssh-key", value_name = "KEY")]
        ssh_keys: Vec<String>,
        /// The instance's own disk in GiB [server default: the image's minimum, at least 20].
        #[arg(long)]
        disk_gib: Option<i64>,
        /// Run on spot capacity (cheaper; may be preempted).
        #[arg(long)]
        spot: bool,
    },
    /// One instance: state and why, node, GPUs, SSH.
    Get {
        #[arg(value_name = "NAME_OR_ID")]
        instance: String,
    },
    /// Print the `ssh` command that logs in to the instance (or run it with --exec).
    Ssh {
        #[arg(value_name = "NAME_OR_ID")]
        instance: String,
        /// Run ssh instead of printing the command; arguments after `--` go to ssh.
        #[arg(long)]
        exec: bool,
        /// Extra arguments for ssh (with --exec), after `--`.
        #[arg(last = true, value_name = "SSH_ARGS")]
        args: Vec<String>,
    },
    /// Power the VM off: its GPUs are given back, its disk is kept (billed as storage).
    Stop {
        #[arg(value_name = "NAME_OR_ID")]
        instance: String,
    },
    /// Power a stopped VM on again, on its node.
    Start {
        #[arg(value_name = "NAME_OR_ID")]
        instance: String,
    },
    /// Reboot a running VM.
    Reboot {
        #[arg(value_name = "NAME_OR_ID")]
        instance: String,
    },
    /// Terminate an instance: its disk is destroyed and its GPUs are freed at once.
    Delete {
        #[arg(value_name = "NAME_OR_ID")]
        instance: String,
    },
    /// The VM's serial console: its last lines (boot messages, the guest's own output).
    Console {
        #[arg(value_name = "NAME_OR_ID")]
        instance: String,
        /// How many recent lines to show (0–5000).
        #[arg(long, default_value_t = 100)]
        tail: u32,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// The VM images instances can be created from.
    List,
}

pub async fn run(ctx: &mut Ctx, command: InstancesCommand) -> Result<()> {
    match command {
        InstancesCommand::List => list(ctx).await,
        InstancesCommand::Create {
            name,
            gpu_type,
            gpus,
            image,
            ssh_key_files,
            ssh_keys,
            disk_gib,
            spot,
        } => {
            let keys = collect_keys(&ssh_key_files, &ssh_keys)?;
            let mut body = json!({
                "name": name,
                "gpu_type": gpu_type,
                "gpu_count": gpus,
                "image": image,
                "ssh_public_keys": keys,
            });
            if let Some(d) = disk_gib {
                body["disk_gib"] = json!(d);
            }
            if spot {
                body["spot"] = json!(true);
            }
            create(ctx, &body).await
        }
        InstancesCommand::Get { instance } => get(ctx, &instance).await,
        InstancesCommand::Ssh {
            instance,
            exec,
            args,
        } => ssh(ctx, &instance, exec, &args).await,
        InstancesCommand::Stop { instance } => power(ctx, &instance, "stop").await,
        InstancesCommand::Start { instance } => power(ctx, &instance, "start").await,
        InstancesCommand::Reboot { instance } => power(ctx, &instance, "reboot").await,
        InstancesCommand::Delete { instance } => delete(ctx, &instance).await,
        InstancesCommand::Console { instance, tail } => console(ctx, &instance, tail).await,
    }
}

pub async fn images(ctx: &mut Ctx, command: ImagesCommand) -> Result<()> {
    match command {
        ImagesCommand::List => {
            let list = ctx.client.get("/v1/images").await?;
            ctx.show(&list, |list| {
                output::table(
                    &["NAME", "LOGIN USER", "MIN DISK", "DESCRIPTION"],
                    items(list).iter().map(|i| {
                        vec![
                            cell(i, "name"),
                            cell(i, "login_user"),
                            format!("{} GiB", cell(i, "min_disk_gib")),
                            cell(i, "description"),
                        ]
                    }),
                );
            });
            Ok(())
        }
    }
}

// ---- SSH keys ----

/// The keys of `--ssh-key-file`s and `--ssh-key`s, in order. Files are read as
/// `authorized_keys`-style text (one key a line, `#` comments); a private key is refused here,
/// before anything is sent.
pub fn collect_keys(files: &[PathBuf], keys: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for path in files {
        out.extend(read_key_file(path)?);
    }
    for k in keys {
        let k = k.trim();
        if k.is_empty() {
            bail!("--ssh-key is empty");
        }
        if k.contains("PRIVATE KEY") {
            bail!("--ssh-key: that is a private key; give the public one (the .pub file's line)");
        }
        out.push(k.to_owned());
    }
    if out.is_empty() {
        bail!(
            "no SSH key: pass --ssh-key-file ~/.ssh/id_ed25519.pub (or --ssh-key 'ssh-ed25519 AAAA…'); it is the only way into the VM"
        );
    }
    Ok(out)
}

/// `~/…` as the shell would have expanded it (it does not after `--ssh-key-file=`).
fn expand_home(path: &Path) -> PathBuf {
    match (path.strip_prefix("~"), dirs::home_dir()) {
        (Ok(rest), Some(home)) => home.join(rest),
        _ => path.to_path_buf(),
    }
}

fn read_key_file(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(expand_home(path))
        .with_context(|| format!("--ssh-key-file {}: cannot read it", path.display()))?;
    if text.contains("PRIVATE KEY") {
        bail!(
            "--ssh-key-file {}: that is a private key, which never leaves your machine; give the public one ({}.pub)",
            path.display(),
            path.display()
        );
    }
    let keys: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if keys.is_empty() {
        bail!("--ssh-key-file {}: holds no public key", path.display());
    }
    Ok(keys)
}

// ---- finding an instance ----

/// The instance `name_or_id` names in `org`, as the API shows it.
async fn find(ctx: &mut Ctx, org: &str, name_or_id: &str) -> Result<Value> {
    if name_or_id.starts_with("ins_") {
        return Ok(ctx
            .client
            .get(&format!(
                "/v1/orgs/{}/instances/{}",
                seg(org),
                seg(name_or_id)
            ))
            .await?);
    }
    let list = ctx
        .client
        .list_all(&format!("/v1/orgs/{}/instances", seg(org)))
        .await?;
    pick(items(&list), name_or_id, org)
}

/// The one live instance called `name`, else the newest of that name (the list is newest first).
fn pick(list: &[Value], name: &str, org: &str) -> Result<Value> {
    let named: Vec<&Value> = list
        .iter()
        .filter(|i| i.get("name").and_then(Value::as_str) == Some(name))
        .collect();
    let live: Vec<&Value> = named
        .iter()
        .copied()
        .filter(|i| i.get("state").and_then(Value::as_str) != Some("terminated"))
        .collect();
    match (live.as_slice(), named.first()) {
        ([one], _) => Ok((*one).clone()),
        ([], Some(newest)) => Ok((*newest).clone()),
        ([], None) => Err(anyhow!(
            "no instance `{name}` in {org}: see `kiln instances list`"
        )),
        (many, _) => Err(anyhow!(
            "{} instances are called `{name}` in {org}; use an ID: {}",
            many.len(),
            many.iter()
                .map(|i| cell(i, "id"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

fn id_of(v: &Value) -> Result<String> {
    v.get("id")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("the API answered an instance without an id"))
}

// ---- how an instance reads ----

fn state_label(i: &Value) -> String {
    let reason = cell(i, "state_reason");
    if reason == "-" {
        cell(i, "state")
    } else {
        format!("{} ({reason})", cell(i, "state"))
    }
}

fn gpu_label(i: &Value) -> String {
    format!("{} × {}", cell(i, "gpu_count"), cell(i, "gpu_type"))
}

fn ssh_command(i: &Value) -> Option<String> {
    i.pointer("/ssh/command")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

// ---- commands ----

async fn list(ctx: &mut Ctx) -> Result<()> {
    let org = ctx.org().await?;
    let list = ctx
        .client
        .list_all(&format!("/v1/orgs/{}/instances", seg(&org)))
        .await?;
    ctx.show(&list, |list| {
        output::table(
            &[
                "ID", "NAME", "IMAGE", "GPU", "STATE", "NODE", "SSH", "CREATED",
            ],
            items(list).iter().map(|i| {
                vec![
                    cell(i, "id"),
                    cell(i, "name"),
                    cell(i, "image"),
                    gpu_label(i),
                    cell(i, "state"),
                    cell(i, "node"),
                    ssh_command(i).unwrap_or_else(|| "-".into()),
                    when(i, "created_at"),
                ]
            }),
        );
    });
    Ok(())
}

async fn create(ctx: &mut Ctx, body: &Value) -> Result<()> {
    let org = ctx.org().await?;
    let i = ctx
        .client
        .create(&format!("/v1/orgs/{}/instances", seg(&org)), body)
        .await?;
    ctx.show(&i, |i| {
        println!(
            "Created instance {} ({}) in {org}: {}.",
            cell(i, "name"),
            cell(i, "id"),
            state_label(i)
        );
        println!(
            "Once it runs, `kiln instances ssh {}` prints how to log in.",
            cell(i, "name")
        );
    });
    Ok(())
}

async fn get(ctx: &mut Ctx, instance: &str) -> Result<()> {
    let org = ctx.org().await?;
    let i = find(ctx, &org, instance).await?;
    ctx.show(&i, |i| {
        let gpus = i["gpus"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into());
        let keys = i["ssh_public_keys"].as_array().map_or(0, Vec::len);
        output::fields(&[
            ("Instance", cell(i, "id")),
            ("Name", cell(i, "name")),
            ("Image", cell(i, "image")),
            ("State", state_label(i)),
            ("Power", cell(i, "power")),
            ("GPU", gpu_label(i)),
            ("Node", cell(i, "node")),
            ("GPUs held", gpus),
            (
                "Resources",
                format!(
                    "{} CPU, {} GiB memory, {} GiB disk{}",
                    cell(i, "cpu"),
                    cell(i, "memory_gib"),
                    cell(i, "disk_gib"),
                    if i["spot"].as_bool() == Some(true) {
                        ", spot"
                    } else {
                        ""
                    }
                ),
            ),
            (
                "SSH",
                ssh_command(i).unwrap_or_else(|| "- (not reachable yet)".into()),
            ),
            ("SSH keys", keys.to_string()),
            ("Reboots", cell(i, "reboot_count")),
            ("Created", when(i, "created_at")),
            ("Updated", when(i, "updated_at")),
        ]);
    });
    Ok(())
}

async fn ssh(ctx: &mut Ctx, instance: &str, exec: bool, args: &[String]) -> Result<()> {
    let org = ctx.org().await?;
    let i = find(ctx, &org, instance).await?;
    let Some(ssh) = i.get("ssh").filter(|s| !s.is_null()) else {
        bail!(
            "instance {} has no SSH address yet: it is {}; try again once it is running (`kiln instances get {}`)",
            cell(&i, "name"),
            state_label(&i),
            cell(&i, "id")
        );
    };
    if exec {
        let port = cell(ssh, "port");
        let target = format!("{}@{}", cell(ssh, "user"), cell(ssh, "host"));
        let mut cmd = std::process::Command::new("ssh");
        cmd.arg("-p").arg(&port).arg(&target).args(args);
        use std::os::unix::process::CommandExt;
        let err = cmd.exec();
        return Err(anyhow!("could not run ssh: {err}"));
    }
    if ctx.format == Format::Json {
        output::json(ssh);
    } else {
        println!("{}", cell(ssh, "command"));
    }
    Ok(())
}

async fn power(ctx: &mut Ctx, instance: &str, what: &str) -> Result<()> {
    let org = ctx.org().await?;
    let id = id_of(&find(ctx, &org, instance).await?)?;
    let i = ctx
        .client
        .post(
            &format!("/v1/orgs/{}/instances/{}/{what}", seg(&org), seg(&id)),
            &json!({}),
        )
        .await?;
    ctx.show(&i, |i| {
        let done = match what {
            "stop" => "Stopping",
            "start" => "Starting",
            _ => "Rebooting",
        };
        println!(
            "{done} instance {} ({id}): {}.",
            cell(i, "name"),
            state_label(i)
        );
    });
    Ok(())
}

async fn delete(ctx: &mut Ctx, instance: &str) -> Result<()> {
    let org = ctx.org().await?;
    let id = id_of(&find(ctx, &org, instance).await?)?;
    let i = ctx
        .client
        .delete(&format!("/v1/orgs/{}/instances/{}", seg(&org), seg(&id)))
        .await?;
    ctx.show(&i, |i| {
        println!(
            "Terminated instance {} ({id}): {}; its disk is gone and its GPUs are free.",
            cell(i, "name"),
            cell(i, "state")
        );
    });
    Ok(())
}

async fn console(ctx: &mut Ctx, instance: &str, tail: u32) -> Result<()> {
    let org = ctx.org().await?;
    let id = id_of(&find(ctx, &org, instance).await?)?;
    let path = format!("/v1/orgs/{}/instances/{}/console", seg(&org), seg(&id));
    let resp = ctx
        .client
        .open_stream(&path, &[("tail", tail.to_string())], None)
        .await?;
    let text = resp.text().await?;
    if ctx.format == Format::Json {
        for line in text.lines() {
            output::json(&json!({ "text": line }));
        }
    } else {
        print!("{text}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_pick_the_live_instance_else_the_newest() {
        let list = vec![
            json!({"id": "ins_3", "name": "a", "state": "terminated"}),
            json!({"id": "ins_2", "name": "a", "state": "running"}),
            json!({"id": "ins_1", "name": "b", "state": "terminated"}),
            json!({"id": "ins_0", "name": "b", "state": "terminated"}),
        ];
        assert_eq!(pick(&list, "a", "org_x").unwrap()["id"], "ins_2");
        assert_eq!(pick(&list, "b", "org_x").unwrap()["id"], "ins_1");
        let none = pick(&list, "c", "org_x").unwrap_err().to_string();
        assert!(none.contains("no instance `c`"), "{none}");
        let two = vec![
            json!({"id": "ins_5", "name": "d", "state": "running"}),
            json!({"id": "ins_4", "name": "d", "state": "stopped"}),
        ];
        let many = pick(&two, "d", "org_x").unwrap_err().to_string();
        assert!(many.contains("ins_5, ins_4"), "{many}");
    }

    #[test]
    fn key_files_are_read_line_by_line_and_private_keys_refused() {
        let dir = std::env::temp_dir().join(format!("kiln-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let public = dir.join("id.pub");
        std::fs::write(
            &public,
            "# mine\nssh-ed25519 AAAA one\n\nssh-rsa BBBB two\n",
        )
        .unwrap();
        let private = dir.join("id");
        std::fs::write(&private, "-----BEGIN OPENSSH PRIVATE KEY-----\nxyz\n").unwrap();
        assert_eq!(
            collect_keys(
                std::slice::from_ref(&public),
                &["ssh-ed25519 CCCC three".into()]
            )
            .unwrap(),
            [
                "ssh-ed25519 AAAA one",
                "ssh-rsa BBBB two",
                "ssh-ed25519 CCCC three"
            ]
        );
        let err = collect_keys(&[private], &[]).unwrap_err().to_string();
        assert!(err.contains("private key"), "{err}");
        let err = collect_keys(&[], &[]).unwrap_err().to_string();
        assert!(err.contains("no SSH key"), "{err}");
        let err = collect_keys(&[dir.join("missing.pub")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read it"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        if let Some(home) = dirs::home_dir() {
            assert_eq!(
                expand_home(Path::new("~/.ssh/id.pub")),
                home.join(".ssh/id.pub")
            );
        }
        assert_eq!(expand_home(Path::new("/k/id.pub")), Path::new("/k/id.pub"));
    }
}
