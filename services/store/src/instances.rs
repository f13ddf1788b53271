//! What instances (VMs) need beyond any workload: power changes in place.
//!
//! A tenant's stop, start or reboot is a new generation of the instance's assignment on the
//! same node (the agent powers the VM off, on, or reboots it). A stopped instance keeps its
//! node's CPU, memory and disk (its overlay disk lives there) but gives its GPUs back; a start
//! takes whole GPUs of its type on the same node again, the ones it had when they are free.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::fleet::AssignmentRecord;
use crate::scheduling::{WORKLOAD_COLUMNS, WorkloadRecord, wake_schedulers};
use crate::{OrgScope, PENDING_CHANNEL, Store, StoreError, StoreResult};

/// A whole GPU's slot range (as the placer holds it).
const WHOLE: (i64, i64) = (0, i64::MAX / 2);

impl Store {
    /// Lock one instance of the scope's org for the rest of `conn`'s transaction; another org's
    /// (or a pod) is `NotFound`.
    pub async fn instance_lock(
        &self,
        conn: &mut PgConnection,
        scope: &OrgScope,
        id: Uuid,
    ) -> StoreResult<WorkloadRecord> {
        sqlx::query_as(&format!(
            "SELECT {WORKLOAD_COLUMNS} FROM workloads
             WHERE id = $1 AND org_id = $2 AND kind = 'instance' FOR UPDATE"
        ))
        .bind(id)
        .bind(scope.org_id().as_uuid())
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound { what: "instance" })
    }

    /// The assignment as its node's log has it now.
    pub async fn assignment_get(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
    ) -> StoreResult<Option<AssignmentRecord>> {
        Ok(sqlx::query_as(
            "SELECT id, node_id, generation, kind, spec, gpu_uuids, revision, created_at,
                    updated_at
             FROM node_assignments WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?)
    }

    /// Give back a workload's GPU slots only (its node's CPU, memory and disk stay held) and
    /// tell the schedulers to read the fleet again. Answers the GPUs it held.
    pub async fn instance_gpus_release(
        &self,
        conn: &mut PgConnection,
        workload: Uuid,
    ) -> StoreResult<Vec<String>> {
        let rows: Vec<(String,)> =
            sqlx::query_as("DELETE FROM gpu_allocations WHERE workload_id = $1 RETURNING gpu_uuid")
                .bind(workload)
                .fetch_all(&mut *conn)
                .await?;
        if !rows.is_empty() {
            // The placer's cached view cannot express "GPUs freed, CPU kept": read it all again.
            sqlx::query("SELECT pg_notify($1, 'freed:*')")
                .bind(PENDING_CHANNEL)
                .execute(&mut *conn)
                .await?;
        }
        Ok(rows.into_iter().map(|(u,)| u).collect())
    }

    /// Take `count` whole GPUs of `gpu_type` on `node` for `workload`: healthy, not in MIG mode,
    /// held by nobody, those in `prefer` first, then in index order. `None` when there are not
    /// enough (or another placement took one first; nothing is held then). The exclusion
    /// constraints on `gpu_allocations` are the guard against a racing scheduler.
    pub async fn instance_gpus_take(
        &self,
        conn: &mut PgConnection,
        workload: Uuid,
        node: Uuid,
        gpu_type: &str,
        count: i32,
        prefer: &[String],
    ) -> StoreResult<Option<Vec<String>>> {
        let free: Vec<(String,)> = sqlx::query_as(
            "SELECT g.uuid FROM node_gpus g
             WHERE g.node_id = $1 AND g.gpu_type = $2 AND g.removed_at IS NULL
               AND g.health <> 'unhealthy' AND NOT g.mig_enabled
               AND NOT EXISTS (SELECT 1 FROM gpu_allocations a
                               WHERE a.node_id = g.node_id AND a.gpu_uuid = g.uuid)
             ORDER BY (g.uuid = ANY($3)) DESC, g.idx LIMIT $4",
        )
        .bind(node)
        .bind(gpu_type)
        .bind(prefer)
        .bind(i64::from(count.max(0)))
        .fetch_all(&mut *conn)
        .await?;
        if free.len() < count.max(0) as usize {
            return Ok(None);
        }
        let uuids: Vec<String> = free.into_iter().map(|(u,)| u).collect();
        sqlx::query("SAVEPOINT take_gpus")
            .execute(&mut *conn)
            .await?;
        let inserted = sqlx::query(
            "INSERT INTO gpu_allocations (workload_id, node_id, gpu_uuid, mode, slots)
             SELECT $1, $2, u, 'whole', int8range($4, $5) FROM unnest($3::text[]) AS u",
        )
        .bind(workload)
        .bind(node)
        .bind(&uuids)
        .bind(WHOLE.0)
        .bind(WHOLE.1)
        .execute(&mut *conn)
        .await;
        match inserted {
            Ok(_) => {
                sqlx::query("RELEASE SAVEPOINT take_gpus")
                    .execute(&mut *conn)
                    .await?;
                Ok(Some(uuids))
            }
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23P01") => {
                sqlx::query("ROLLBACK TO SAVEPOINT take_gpus")
                    .execute(&mut *conn)
                    .await?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Set a placed instance's state, reason and spec (its desired power and reboot count).
    pub async fn instance_set(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
        state: &str,
        reason: &str,
        spec: &serde_json::Value,
    ) -> StoreResult<()> {
        sqlx::query(
            "UPDATE workloads SET state = $2, state_reason = $3, spec = $4,
                 state_changed_at = CASE WHEN state = $2 THEN state_changed_at ELSE now() END,
                 updated_at = now()
             WHERE id = $1",
        )
        .bind(id)
        .bind(state)
        .bind(reason)
        .bind(spec)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }

    /// Queue an instance that holds nothing (stopped by a drain or for credit, or failed) to be
    /// placed again, with `spec`; wakes the schedulers.
    pub async fn instance_requeue(
        &self,
        conn: &mut PgConnection,
        id: Uuid,
        spec: &serde_json::Value,
    ) -> StoreResult<()> {
        let done = sqlx::query(
            "UPDATE workloads SET state = 'pending', state_reason = 'waiting for the scheduler',
                 spec = $2, state_changed_at = now(), updated_at = now()
             WHERE id = $1 AND node_id IS NULL",
        )
        .bind(id)
        .bind(spec)
        .execute(&mut *conn)
        .await?;
        if done.rows_affected() != 1 {
            return Err(StoreError::Conflict {
                what: "placement for this instance",
            });
        }
        wake_schedulers(conn).await
    }
}
