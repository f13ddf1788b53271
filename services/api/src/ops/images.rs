//! The VM image catalog: what instances boot. Anyone signed in lists the active images;
//! operators manage the catalog (`/v1/admin/images…`, 404 for anyone else, as all of `/admin`).
//!
//! An instance copies its image's row into its spec when it is created, so editing or
//! deprecating an image never changes what an existing instance boots.

use kiln_store::{StoreError, VmImageFields, VmImageRecord};
use sqlx::PgConnection;

use super::Checks;
use super::fleet::{audit, require_operator};
use crate::error::ApiError;
use crate::state::{AppState, Caller};
use crate::views::*;

pub const STATUSES: [&str; 2] = ["active", "deprecated"];
const MAX_PATH: usize = 1024;
const MAX_DESCRIPTION: usize = 500;
const MAX_KERNEL_ARGS: usize = 4096;

/// Active images, for anyone signed in.
pub async fn list(state: &AppState, _caller: &Caller) -> Result<VmImageList, ApiError> {
    let rows = state.store.vm_image_list(false).await?;
    Ok(VmImageList {
        items: rows.iter().map(VmImageView::from).collect(),
    })
}

/// Every image, deprecated ones too: operators only.
pub async fn admin_list(state: &AppState, caller: &Caller) -> Result<VmImageList, ApiError> {
    require_operator(caller)?;
    let rows = state.store.vm_image_list(true).await?;
    Ok(VmImageList {
        items: rows.iter().map(VmImageView::from).collect(),
    })
}

pub async fn admin_get(
    state: &AppState,
    caller: &Caller,
    name: &str,
) -> Result<VmImageView, ApiError> {
    require_operator(caller)?;
    let mut conn = state
        .store
        .pool()
        .acquire()
        .await
        .map_err(StoreError::from)?;
    let row = state
        .store
        .vm_image_get(&mut conn, name)
        .await?
        .ok_or(ApiError::NotFound("image"))?;
    Ok(VmImageView::from(&row))
}

/// Add an image (409 when the name is taken).
pub async fn create(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    input: &VmImageInput,
) -> Result<VmImageView, ApiError> {
    require_operator(caller)?;
    let mut checks = Checks::default();
    let name = match input.name.as_deref().map(str::trim) {
        None | Some("") => {
            checks.push("name", "is required");
            None
        }
        Some(n) => check_name(n, &mut checks).then(|| n.to_owned()),
    };
    let fields = validate(input, &mut checks);
    checks.finish()?;
    let name = name.ok_or_else(|| ApiError::BadRequest("invalid image".into()))?;
    let row = state
        .store
        .vm_image_create(conn, &name, &fields.as_fields())
        .await?;
    record(state, conn, caller, "image.create", &row).await?;
    Ok(VmImageView::from(&row))
}

/// Create or replace an image by name; answers whether it was created.
pub async fn put(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    name: &str,
    input: &VmImageInput,
) -> Result<(VmImageView, bool), ApiError> {
    require_operator(caller)?;
    let mut checks = Checks::default();
    check_name(name, &mut checks);
    if input.name.as_deref().is_some_and(|n| n.trim() != name) {
        checks.push("name", "must match the name in the path (or be left out)");
    }
    let fields = validate(input, &mut checks);
    checks.finish()?;
    let (row, created) = state
        .store
        .vm_image_put(conn, name, &fields.as_fields())
        .await?;
    let action = if created {
        "image.create"
    } else {
        "image.update"
    };
    record(state, conn, caller, action, &row).await?;
    Ok((VmImageView::from(&row), created))
}

/// Remove an image no live instance was created from (409 otherwise: deprecate it instead).
pub async fn delete(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    name: &str,
) -> Result<(), ApiError> {
    require_operator(caller)?;
    if state.store.vm_image_get(conn, name).await?.is_none() {
        return Err(ApiError::NotFound("image"));
    }
    let in_use = state.store.vm_image_in_use(conn, name).await?;
    if in_use > 0 {
        return Err(ApiError::Conflict(format!(
            "{in_use} instance(s) not yet terminated were created from image `{name}`; \
             deprecate it (status `deprecated`) so no new ones are, and delete it once they are gone"
        )));
    }
    state.store.vm_image_delete(conn, name).await?;
    let event = audit(
        caller,
        "image.delete",
        name.to_owned(),
        serde_json::json!({}),
    );
    state.store.audit_record(conn, &event).await?;
    Ok(())
}

async fn record(
    state: &AppState,
    conn: &mut PgConnection,
    caller: &Caller,
    action: &'static str,
    row: &VmImageRecord,
) -> Result<(), ApiError> {
    let event = audit(
        caller,
        action,
        row.name.clone(),
        serde_json::json!({
            "kernel": row.kernel, "initrd": row.initrd, "disk": row.disk,
            "login_user": row.login_user, "min_disk_gib": row.min_disk_gib, "status": row.status,
        }),
    );
    state.store.audit_record(conn, &event).await?;
    Ok(())
}

/// A catalog name: 1–63 of `a-z 0-9 . _ -`, starting and ending with a letter or digit.
pub fn valid_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(c))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

fn check_name(name: &str, checks: &mut Checks) -> bool {
    let ok = valid_name(name);
    if !ok {
        checks.push(
            "name",
            "must be 1-63 lowercase letters, digits, '.', '_' or '-', starting and ending with a letter or digit",
        );
    }
    ok
}

struct Fields {
    description: String,
    kernel: String,
    initrd: String,
    disk: String,
    kernel_args: String,
    login_user: String,
    min_disk_gib: i64,
    status: String,
}

impl Fields {
    fn as_fields(&self) -> VmImageFields<'_> {
        VmImageFields {
            description: &self.description,
            kernel: &self.kernel,
            initrd: &self.initrd,
            disk: &self.disk,
            kernel_args: &self.kernel_args,
            login_user: &self.login_user,
            min_disk_gib: self.min_disk_gib,
            status: &self.status,
        }
    }
}

fn path_field(field: &str, value: Option<&String>, checks: &mut Checks) -> String {
    let v = value.map(|s| s.trim().to_owned()).unwrap_or_default();
    if v.len() > MAX_PATH {
        checks.push(field, format!("must be at most {MAX_PATH} bytes"));
    } else if v.chars().any(char::is_control) {
        checks.push(field, "must not contain control characters");
    } else if v.split('/').any(|part| part == "..") {
        checks.push(field, "must not contain `..`");
    }
    v
}

fn validate(input: &VmImageInput, checks: &mut Checks) -> Fields {
    let description = input.description.clone().unwrap_or_default();
    if description.chars().count() > MAX_DESCRIPTION {
        checks.push(
            "description",
            format!("must be at most {MAX_DESCRIPTION} characters"),
        );
    }
    let kernel = path_field("kernel", input.kernel.as_ref(), checks);
    let initrd = path_field("initrd", input.initrd.as_ref(), checks);
    let disk = path_field("disk", input.disk.as_ref(), checks);
    if kernel.is_empty() && disk.is_empty() {
        checks.push(
            "kernel",
            "give a kernel (with an optional initrd), a base disk, or both",
        );
    }
    if !initrd.is_empty() && kernel.is_empty() {
        checks.push("initrd", "needs a kernel");
    }
    let kernel_args = input.kernel_args.clone().unwrap_or_default();
    if kernel_args.len() > MAX_KERNEL_ARGS || kernel_args.chars().any(char::is_control) {
        checks.push(
            "kernel_args",
            format!("must be at most {MAX_KERNEL_ARGS} bytes without control characters"),
        );
    }
    let login_user = input
        .login_user
        .as_deref()
        .map(str::trim)
        .unwrap_or("root")
        .to_owned();
    let lb = login_user.as_bytes();
    if lb.is_empty()
        || lb.len() > 32
        || !(lb[0].is_ascii_lowercase() || lb[0] == b'_')
        || !lb
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"_-".contains(c))
    {
        checks.push(
            "login_user",
            "must be a Unix user name: 1-32 lowercase letters, digits, '_' or '-', not starting with a digit",
        );
    }
    let min_disk_gib = input.min_disk_gib.unwrap_or(1);
    if !(1..=super::instances::MAX_DISK_GIB).contains(&min_disk_gib) {
        checks.push(
            "min_disk_gib",
            format!("must be between 1 and {}", super::instances::MAX_DISK_GIB),
        );
    }
    let status = input
        .status
        .as_deref()
        .map(str::trim)
        .unwrap_or("active")
        .to_owned();
    if !STATUSES.contains(&status.as_str()) {
        checks.push("status", "must be active or deprecated");
    }
    Fields {
        description,
        kernel,
        initrd,
        disk,
        kernel_args,
        login_user,
        min_disk_gib,
        status,
    }
}
