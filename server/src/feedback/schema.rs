//! The SQLite schema, versioned in code: migration `i` (0-based) takes the database from
//! `PRAGMA user_version = i` to `i + 1`, inside one transaction. Append new migrations; never
//! edit a released one. A database newer than [`MIGRATIONS`] is refused, not downgraded.

use rusqlite::Connection;

use super::FeedbackError;

/// Each entry is one schema version's DDL.
pub const MIGRATIONS: &[&str] = &[
    // v1: completions with their choices, feedback, idempotency keys, training marks.
    r#"
    CREATE TABLE completions (
        id              TEXT PRIMARY KEY,
        tenant          TEXT NOT NULL,
        -- adapter name (`base` for the base model): what stats, export and delete select on
        adapter         TEXT NOT NULL,
        adapter_version TEXT NOT NULL,
        model           TEXT NOT NULL,
        endpoint        TEXT NOT NULL,
        -- the messages (chat) or prompt (completions) as sent, JSON
        request         TEXT NOT NULL,
        params          TEXT NOT NULL,
        prompt_tokens   TEXT NOT NULL,
        -- hash of the whitespace-normalised prompt (pairing groups on it)
        prompt_key      TEXT NOT NULL,
        user            TEXT,
        created         INTEGER NOT NULL,
        ttft_secs       REAL NOT NULL,
        duration_secs   REAL NOT NULL,
        -- `served` or `import`
        source          TEXT NOT NULL
    );
    CREATE INDEX completions_by_adapter ON completions (tenant, adapter, prompt_key);
    CREATE INDEX completions_by_created ON completions (created);
    CREATE TABLE choices (
        completion_id TEXT NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
        idx           INTEGER NOT NULL,
        text          TEXT NOT NULL,
        token_ids     TEXT NOT NULL,
        finish_reason TEXT NOT NULL,
        PRIMARY KEY (completion_id, idx)
    ) WITHOUT ROWID;
    CREATE TABLE feedback (
        -- submission order, for deterministic pairing
        seq           INTEGER PRIMARY KEY AUTOINCREMENT,
        id            TEXT NOT NULL UNIQUE,
        completion_id TEXT NOT NULL REFERENCES completions (id) ON DELETE CASCADE,
        choice_index  INTEGER NOT NULL,
        rating        TEXT NOT NULL CHECK (rating IN ('up', 'down')),
        correction    TEXT,
        comment       TEXT,
        created       INTEGER NOT NULL,
        updated       INTEGER NOT NULL,
        UNIQUE (completion_id, choice_index)
    );
    CREATE TABLE idempotency_keys (
        tenant      TEXT NOT NULL,
        key         TEXT NOT NULL,
        feedback_id TEXT NOT NULL REFERENCES feedback (id) ON DELETE CASCADE,
        PRIMARY KEY (tenant, key)
    ) WITHOUT ROWID;
    CREATE INDEX idempotency_keys_by_feedback ON idempotency_keys (feedback_id);
    CREATE TABLE trained (
        tenant      TEXT NOT NULL,
        adapter     TEXT NOT NULL,
        example_key TEXT NOT NULL,
        version     INTEGER NOT NULL,
        created     INTEGER NOT NULL,
        PRIMARY KEY (tenant, adapter, example_key, version)
    ) WITHOUT ROWID;
    "#,
    // v2: a completions request may send several prompts; each choice names the one it answers
    // (an index into the request's list of prompts).
    r#"
    ALTER TABLE choices ADD COLUMN prompt_index INTEGER NOT NULL DEFAULT 0;
    "#,
];

/// The schema version this program writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Brings `conn` to [`current_version`]; returns the version found before. Each step reads
/// the version inside its write transaction, so servers opening one fresh file at the same
/// time migrate it once between them.
pub fn migrate(conn: &mut Connection) -> Result<i64, FeedbackError> {
    let mut found = None;
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let version: i64 = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        found.get_or_insert(version);
        if version > current_version() {
            return Err(FeedbackError::SchemaTooNew {
                found: version,
                supported: current_version(),
            });
        }
        let Some(ddl) = usize::try_from(version)
            .ok()
            .and_then(|v| MIGRATIONS.get(v))
        else {
            tx.commit()?;
            return Ok(found.unwrap_or(version));
        };
        tx.execute_batch(ddl)?;
        tx.pragma_update(None, "user_version", version + 1)?;
        tx.commit()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_a_fresh_database_once() {
        let mut c = Connection::open_in_memory().expect("open");
        assert_eq!(migrate(&mut c).expect("migrate"), 0);
        assert_eq!(migrate(&mut c).expect("again"), current_version());
        let n: i64 = c
            .query_row("SELECT count(*) FROM feedback", [], |r| r.get(0))
            .expect("table exists");
        assert_eq!(n, 0);
    }

    #[test]
    fn two_connections_migrating_one_fresh_file_both_succeed() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("db.sqlite");
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut c = Connection::open(&path).expect("open");
                    c.busy_timeout(std::time::Duration::from_secs(10))
                        .expect("busy");
                    migrate(&mut c)
                })
            })
            .collect();
        for h in handles {
            let r = h.join().expect("thread");
            assert!(r.is_ok(), "{r:?}");
        }
    }

    #[test]
    fn a_v1_database_keeps_its_choices_and_gains_prompt_index_zero() {
        let mut c = Connection::open_in_memory().expect("open");
        c.execute_batch(MIGRATIONS[0]).expect("v1");
        c.pragma_update(None, "user_version", 1).expect("set");
        c.execute_batch(
            "INSERT INTO completions VALUES ('cmpl-1', 't', 'base', 'base', 'm', 'completions',
                 '\"hi\"', '{}', '[1]', 'k', NULL, 0, 0.0, 0.0, 'served');
             INSERT INTO choices VALUES ('cmpl-1', 0, 'out', '[2]', 'stop');",
        )
        .expect("v1 rows");
        assert_eq!(migrate(&mut c).expect("migrate"), 1);
        let (text, prompt_index): (String, i64) = c
            .query_row(
                "SELECT text, prompt_index FROM choices WHERE completion_id = 'cmpl-1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("row kept");
        assert_eq!((text.as_str(), prompt_index), ("out", 0));
    }

    #[test]
    fn refuses_a_newer_database() {
        let mut c = Connection::open_in_memory().expect("open");
        c.pragma_update(None, "user_version", current_version() + 1)
            .expect("set");
        assert!(matches!(
            migrate(&mut c),
            Err(FeedbackError::SchemaTooNew { .. })
        ));
    }
}
