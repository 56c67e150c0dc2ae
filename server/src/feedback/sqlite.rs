//! [`FeedbackStore`] on one SQLite file: WAL journal, `synchronous=FULL`, foreign keys on.
//!
//! All writes go through one writer thread that owns the only writing connection. Requests
//! send an operation with a oneshot acknowledgement; the writer takes whatever is queued (up
//! to [`MAX_BATCH`]), runs each operation in its own savepoint inside one transaction, commits
//! once, and only then acknowledges them all. Many concurrent requests so share one fsync
//! (group commit), and an acknowledged write is always committed. One failing operation rolls
//! back its savepoint only; a failing commit fails every operation of the batch.
//!
//! Reads run on a small pool of separate connections (WAL lets them proceed while the writer
//! commits), off the async workers via `spawn_blocking`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Transaction};
use tokio::sync::oneshot;

use super::pairing::{self, ExampleKey, Prompt, RatedOutput, TrainingExamples};
use super::{
    adapter_of, schema, Deleted, FeedbackError, FeedbackStore, ImportExample, NewFeedback, Rating,
    Stats, StoreFuture, Submitted,
};
use crate::recorder::{
    CompletionRecord, CompletionRecorder, RecordAck, RecordError, RecordedChoice,
};

/// Most operations committed in one transaction.
pub const MAX_BATCH: usize = 1024;
/// Reader connections kept open between reads.
const READER_POOL: usize = 4;
/// How long a connection waits on a lock held by another process before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the writer deletes completions past their retention.
const PURGE_INTERVAL: Duration = Duration::from_secs(3600);

/// How the store is opened.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The database file; it and its parent directories are created when missing.
    pub path: PathBuf,
    /// Completions without feedback older than this are deleted; `None` keeps them.
    pub retention: Option<Duration>,
}

type Ack<T> = oneshot::Sender<Result<T, FeedbackError>>;

/// One write, with where its result goes.
enum Op {
    Record(Box<CompletionRecord>, Ack<()>),
    Feedback(NewFeedback, Ack<Submitted>),
    MarkTrained {
        tenant: String,
        adapter: String,
        keys: Vec<ExampleKey>,
        version: u32,
        ack: Ack<u64>,
    },
    Delete {
        tenant: String,
        adapter: String,
        ack: Ack<Deleted>,
    },
    Import {
        tenant: String,
        adapter: String,
        examples: Vec<ImportExample>,
        ack: Ack<u64>,
    },
}

/// Sends an operation's result once the batch's commit outcome is known.
type Finish = Box<dyn FnOnce(Option<&FeedbackError>) + Send>;

fn finisher<T: Send + 'static>(ack: Ack<T>, result: Result<T, FeedbackError>) -> Finish {
    Box::new(move |commit_error| {
        let _ = ack.send(match commit_error {
            Some(e) => Err(e.clone()),
            None => result,
        });
    })
}

struct Inner {
    path: PathBuf,
    sender: Mutex<Option<mpsc::Sender<Op>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
}

/// The SQLite feedback store; cheap to clone (all clones share the writer).
#[derive(Clone)]
pub struct SqliteFeedbackStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqliteFeedbackStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteFeedbackStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn open_connection(path: &Path) -> Result<Connection, FeedbackError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(FeedbackError::Storage(format!(
            "{}: journal_mode is `{mode}`, WAL could not be enabled",
            path.display()
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// An exclusive advisory lock (`flock`) on `<database>.open-lock`, held while a process opens
/// and migrates the database; released when dropped (or when the process dies).
struct StartupLock {
    _file: std::fs::File,
}

impl StartupLock {
    fn take(db: &Path) -> Result<StartupLock, FeedbackError> {
        let mut name = db.as_os_str().to_owned();
        name.push(".open-lock");
        let path = PathBuf::from(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| FeedbackError::Storage(format!("{}: {e}", path.display())))?;
        use std::os::fd::AsRawFd;
        // Safety: `file` is open for the duration of the call; flock only reads the fd.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            return Err(FeedbackError::Storage(format!(
                "locking {}: {e}",
                path.display()
            )));
        }
        Ok(StartupLock { _file: file })
    }
}

impl SqliteFeedbackStore {
    /// Opens (creating and migrating) the database and starts the writer thread.
    pub fn open(opts: StoreOptions) -> Result<Self, FeedbackError> {
        if let Some(dir) = opts.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| FeedbackError::Storage(format!("creating {}: {e}", dir.display())))?;
        }
        let conn = {
            // Servers starting together on a fresh file take turns: switching it to WAL can
            // answer "database is locked" at once instead of waiting for the busy timeout.
            let _turn = StartupLock::take(&opts.path)?;
            let mut conn = open_connection(&opts.path)?;
            schema::migrate(&mut conn)?;
            conn
        };
        let (sender, receiver) = mpsc::channel();
        let retention = opts.retention;
        let writer = std::thread::Builder::new()
            .name("feedback-writer".into())
            .spawn(move || writer_loop(conn, receiver, retention))?;
        Ok(SqliteFeedbackStore {
            inner: Arc::new(Inner {
                path: opts.path,
                sender: Mutex::new(Some(sender)),
                writer: Mutex::new(Some(writer)),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Stops accepting writes, lets the writer commit what is queued and waits for it.
    pub fn close(&self) {
        if let Ok(mut s) = self.inner.sender.lock() {
            s.take();
        }
        let handle = self.inner.writer.lock().ok().and_then(|mut w| w.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    fn send<T: Send + 'static>(&self, make: impl FnOnce(Ack<T>) -> Op) -> StoreFuture<T> {
        let (ack, done) = oneshot::channel();
        let sent = match self.inner.sender.lock() {
            Ok(guard) => guard
                .as_ref()
                .map(|s| s.send(make(ack)).is_ok())
                .unwrap_or(false),
            Err(_) => false,
        };
        Box::pin(async move {
            if !sent {
                return Err(FeedbackError::WriterGone);
            }
            done.await.unwrap_or(Err(FeedbackError::WriterGone))
        })
    }

    /// Runs `f` on a pooled reader connection (blocking).
    fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, FeedbackError>,
    ) -> Result<T, FeedbackError> {
        let pooled = self.inner.readers.lock().ok().and_then(|mut p| p.pop());
        let conn = match pooled {
            Some(c) => c,
            None => open_connection(&self.inner.path)?,
        };
        let result = f(&conn);
        if let Ok(mut pool) = self.inner.readers.lock() {
            if pool.len() < READER_POOL {
                pool.push(conn);
            }
        }
        result
    }

    /// Runs a blocking read off the async workers.
    fn read_async<T: Send + 'static>(
        &self,
        f: impl FnOnce(&SqliteFeedbackStore) -> Result<T, FeedbackError> + Send + 'static,
    ) -> StoreFuture<T> {
        let this = self.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&this))
                .await
                .map_err(|e| FeedbackError::Storage(format!("read task failed: {e}")))?
        })
    }

    /// The rated outputs of `tenant`'s `adapter`, in submission order (blocking).
    pub fn rated_outputs(
        &self,
        tenant: &str,
        adapter: &str,
    ) -> Result<Vec<RatedOutput>, FeedbackError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT f.id, f.completion_id, f.choice_index, c.adapter_version, c.request,
                        ch.text, f.rating, f.correction, f.seq, ch.prompt_index
                 FROM feedback f
                 JOIN completions c ON c.id = f.completion_id
                 JOIN choices ch ON ch.completion_id = f.completion_id AND ch.idx = f.choice_index
                 WHERE c.tenant = ?1 AND c.adapter = ?2
                 ORDER BY f.seq",
            )?;
            let rows = stmt.query_map(params![tenant, adapter], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, Option<String>>(7)?,
                    r.get::<_, i64>(8)?,
                    r.get::<_, i64>(9)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (fid, cid, idx, version, request, text, rating, correction, seq, prompt_index) =
                    row?;
                let request: serde_json::Value = serde_json::from_str(&request)
                    .map_err(|e| FeedbackError::InvalidData(format!("completion {cid}: {e}")))?;
                let prompt_index = usize::try_from(prompt_index).unwrap_or(usize::MAX);
                let Some(prompt) = Prompt::of_choice(&request, prompt_index) else {
                    continue;
                };
                let rating = Rating::parse(&rating).ok_or_else(|| {
                    FeedbackError::InvalidData(format!("feedback {fid}: rating `{rating}`"))
                })?;
                out.push(RatedOutput {
                    feedback_id: fid,
                    completion_id: cid,
                    choice_index: u32::try_from(idx).unwrap_or(u32::MAX),
                    adapter_version: version,
                    prompt,
                    output: text,
                    rating,
                    correction,
                    seq,
                });
            }
            Ok(out)
        })
    }

    /// Training marks of `tenant`'s `adapter` (blocking).
    fn trained_marks(
        &self,
        tenant: &str,
        adapter: &str,
    ) -> Result<HashMap<ExampleKey, Vec<u32>>, FeedbackError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT example_key, version FROM trained
                 WHERE tenant = ?1 AND adapter = ?2 ORDER BY example_key, version",
            )?;
            let rows = stmt.query_map(params![tenant, adapter], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
            })?;
            let mut map: HashMap<ExampleKey, Vec<u32>> = HashMap::new();
            for row in rows {
                let (k, v) = row?;
                map.entry(ExampleKey(k))
                    .or_default()
                    .push(u32::try_from(v).unwrap_or(u32::MAX));
            }
            Ok(map)
        })
    }

    /// [`FeedbackStore::training_examples`], blocking.
    pub fn training_examples_blocking(
        &self,
        tenant: &str,
        adapter: &str,
    ) -> Result<TrainingExamples, FeedbackError> {
        let outputs = self.rated_outputs(tenant, adapter)?;
        let mut ex = pairing::build(&outputs);
        ex.attach_trained(&self.trained_marks(tenant, adapter)?);
        Ok(ex)
    }

    /// [`FeedbackStore::stats`], blocking.
    pub fn stats_blocking(&self, tenant: &str, adapter: &str) -> Result<Stats, FeedbackError> {
        let (up, down, corrections) = self.read(|c| {
            Ok(c.query_row(
                "SELECT coalesce(sum(f.rating = 'up'), 0), coalesce(sum(f.rating = 'down'), 0),
                        coalesce(sum(f.correction IS NOT NULL), 0)
                 FROM feedback f JOIN completions c ON c.id = f.completion_id
                 WHERE c.tenant = ?1 AND c.adapter = ?2",
                params![tenant, adapter],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )?)
        })?;
        let ex = self.training_examples_blocking(tenant, adapter)?;
        Ok(Stats {
            up: up as u64,
            down: down as u64,
            corrections: corrections as u64,
            pairs: ex.pairs.len() as u64,
            demonstrations: ex.demonstrations.len() as u64,
            unpaired_negatives: ex.unpaired_negatives.len() as u64,
            untrained: ex.untrained(),
        })
    }

    /// One completion record, blocking.
    pub fn get_blocking(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<CompletionRecord>, FeedbackError> {
        self.read(|c| {
            let row = c
                .query_row(
                    "SELECT model, adapter_version, endpoint, request, params, prompt_tokens,
                            user, created, ttft_secs, duration_secs
                     FROM completions WHERE id = ?1 AND tenant = ?2",
                    params![id, tenant],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, String>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, String>(5)?,
                            r.get::<_, Option<String>>(6)?,
                            r.get::<_, i64>(7)?,
                            r.get::<_, f64>(8)?,
                            r.get::<_, f64>(9)?,
                        ))
                    },
                )
                .optional()?;
            let Some((
                model,
                adapter_version,
                endpoint,
                request,
                params_json,
                tokens,
                user,
                created,
                ttft,
                dur,
            )) = row
            else {
                return Ok(None);
            };
            let bad =
                |e: serde_json::Error| FeedbackError::InvalidData(format!("completion {id}: {e}"));
            let mut stmt = c.prepare_cached(
                "SELECT idx, text, token_ids, finish_reason, prompt_index FROM choices
                 WHERE completion_id = ?1 ORDER BY idx",
            )?;
            let mut choices = Vec::new();
            let rows = stmt.query_map(params![id], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, i64>(4)?,
                ))
            })?;
            for row in rows {
                let (index, text, token_ids, finish_reason, prompt_index) = row?;
                choices.push(RecordedChoice {
                    index: usize::try_from(index).unwrap_or(usize::MAX),
                    prompt_index: usize::try_from(prompt_index).unwrap_or(usize::MAX),
                    text,
                    token_ids: serde_json::from_str(&token_ids).map_err(bad)?,
                    finish_reason,
                });
            }
            Ok(Some(CompletionRecord {
                id: id.to_string(),
                tenant: tenant.to_string(),
                model,
                adapter_version,
                endpoint: if endpoint == "chat.completions" {
                    "chat.completions"
                } else {
                    "completions"
                },
                request: serde_json::from_str(&request).map_err(bad)?,
                params: serde_json::from_str(&params_json).map_err(bad)?,
                prompt_tokens: read_prompt_tokens(&tokens).map_err(bad)?,
                choices,
                user,
                created: u64::try_from(created).unwrap_or(0),
                ttft_secs: ttft,
                duration_secs: dur,
            }))
        })
    }

    /// Writes and waits for the commit, for callers without an async runtime (the CLI).
    pub fn blocking<T: Send + 'static>(fut: StoreFuture<T>) -> Result<T, FeedbackError> {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(FeedbackError::from)?
            .block_on(fut)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut s) = self.sender.lock() {
            s.take();
        }
        if let Some(h) = self.writer.lock().ok().and_then(|mut w| w.take()) {
            let _ = h.join();
        }
    }
}

impl CompletionRecorder for SqliteFeedbackStore {
    fn record(&self, record: CompletionRecord) -> RecordAck {
        let fut = self.send(|ack| Op::Record(Box::new(record), ack));
        Box::pin(async move { fut.await.map_err(|e| RecordError(e.to_string())) })
    }

    fn get(&self, tenant: &str, id: &str) -> Option<CompletionRecord> {
        match self.get_blocking(tenant, id) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, id, "reading a completion record failed");
                None
            }
        }
    }
}

impl FeedbackStore for SqliteFeedbackStore {
    fn submit(&self, feedback: NewFeedback) -> StoreFuture<Submitted> {
        self.send(|ack| Op::Feedback(feedback, ack))
    }

    fn stats(&self, tenant: &str, adapter: &str) -> StoreFuture<Stats> {
        let (t, a) = (tenant.to_string(), adapter.to_string());
        self.read_async(move |s| s.stats_blocking(&t, &a))
    }

    fn training_examples(&self, tenant: &str, adapter: &str) -> StoreFuture<TrainingExamples> {
        let (t, a) = (tenant.to_string(), adapter.to_string());
        self.read_async(move |s| s.training_examples_blocking(&t, &a))
    }

    fn mark_trained(
        &self,
        tenant: &str,
        adapter: &str,
        examples: Vec<ExampleKey>,
        version: u32,
    ) -> StoreFuture<u64> {
        let (tenant, adapter) = (tenant.to_string(), adapter.to_string());
        self.send(|ack| Op::MarkTrained {
            tenant,
            adapter,
            keys: examples,
            version,
            ack,
        })
    }

    fn delete_adapter(&self, tenant: &str, adapter: &str) -> StoreFuture<Deleted> {
        let (tenant, adapter) = (tenant.to_string(), adapter.to_string());
        self.send(|ack| Op::Delete {
            tenant,
            adapter,
            ack,
        })
    }

    fn import(
        &self,
        tenant: &str,
        adapter: &str,
        examples: Vec<ImportExample>,
    ) -> StoreFuture<u64> {
        let (tenant, adapter) = (tenant.to_string(), adapter.to_string());
        self.send(|ack| Op::Import {
            tenant,
            adapter,
            examples,
            ack,
        })
    }
}

/// The writer thread: group commit until every sender is gone, then return.
fn writer_loop(mut conn: Connection, ops: mpsc::Receiver<Op>, retention: Option<Duration>) {
    let mut last_purge: Option<Instant> = None;
    loop {
        if retention.is_some() && last_purge.is_none_or(|t| t.elapsed() >= PURGE_INTERVAL) {
            if let Some(keep) = retention {
                match purge(&conn, keep) {
                    Ok(n) if n > 0 => tracing::info!(deleted = n, "purged old completions"),
                    Ok(_) => {}
                    Err(e) => tracing::error!(error = %e, "purging old completions failed"),
                }
            }
            last_purge = Some(Instant::now());
        }
        let first = match ops.recv_timeout(PURGE_INTERVAL) {
            Ok(op) => op,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ops.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit_batch(&mut conn, batch);
    }
}

fn commit_batch(conn: &mut Connection, batch: Vec<Op>) {
    let now = crate::unix_now() as i64;
    let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
        Ok(tx) => tx,
        Err(e) => {
            let e = FeedbackError::from(e);
            tracing::error!(error = %e, "starting a feedback transaction failed");
            for op in batch {
                fail(op, &e);
            }
            return;
        }
    };
    let mut finishes: Vec<Finish> = Vec::with_capacity(batch.len());
    for op in batch {
        finishes.push(match op {
            Op::Record(rec, ack) => finisher(
                ack,
                in_savepoint(&mut tx, |c| insert_record(c, &rec, "served")),
            ),
            Op::Feedback(fb, ack) => {
                finisher(ack, in_savepoint(&mut tx, |c| apply_feedback(c, &fb, now)))
            }
            Op::MarkTrained {
                tenant,
                adapter,
                keys,
                version,
                ack,
            } => finisher(
                ack,
                in_savepoint(&mut tx, |c| {
                    mark_trained(c, &tenant, &adapter, &keys, version, now)
                }),
            ),
            Op::Delete {
                tenant,
                adapter,
                ack,
            } => finisher(
                ack,
                in_savepoint(&mut tx, |c| delete_adapter(c, &tenant, &adapter)),
            ),
            Op::Import {
                tenant,
                adapter,
                examples,
                ack,
            } => finisher(
                ack,
                in_savepoint(&mut tx, |c| import(c, &tenant, &adapter, &examples, now)),
            ),
        });
    }
    let commit_error = tx.commit().err().map(FeedbackError::from);
    if let Some(e) = &commit_error {
        tracing::error!(error = %e, "committing feedback failed");
    }
    for f in finishes {
        f(commit_error.as_ref());
    }
}

fn fail(op: Op, e: &FeedbackError) {
    let e = e.clone();
    match op {
        Op::Record(_, ack) => drop(ack.send(Err(e))),
        Op::Feedback(_, ack) => drop(ack.send(Err(e))),
        Op::MarkTrained { ack, .. } => drop(ack.send(Err(e))),
        Op::Delete { ack, .. } => drop(ack.send(Err(e))),
        Op::Import { ack, .. } => drop(ack.send(Err(e))),
    }
}

/// Runs `f` in a savepoint: its changes are kept only if it succeeds.
fn in_savepoint<T>(
    tx: &mut Transaction<'_>,
    f: impl FnOnce(&Connection) -> Result<T, FeedbackError>,
) -> Result<T, FeedbackError> {
    let sp = tx.savepoint()?;
    let v = f(&sp)?;
    sp.commit()?;
    Ok(v)
}

fn insert_record(
    c: &Connection,
    rec: &CompletionRecord,
    source: &str,
) -> Result<(), FeedbackError> {
    let json = |v: &serde_json::Value| v.to_string();
    let prompt_key = Prompt::of_choice(&rec.request, 0)
        .map(|p| p.key())
        .unwrap_or_else(|| pairing::normalise_text(&rec.request.to_string()));
    c.prepare_cached(
        "INSERT INTO completions (id, tenant, adapter, adapter_version, model, endpoint, request,
             params, prompt_tokens, prompt_key, user, created, ttft_secs, duration_secs, source)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
    )?
    .execute(params![
        rec.id,
        rec.tenant,
        adapter_of(&rec.adapter_version),
        rec.adapter_version,
        rec.model,
        rec.endpoint,
        json(&rec.request),
        json(&rec.params),
        write_prompt_tokens(&rec.prompt_tokens),
        prompt_key,
        rec.user,
        i64::try_from(rec.created).unwrap_or(i64::MAX),
        rec.ttft_secs,
        rec.duration_secs,
        source,
    ])?;
    let mut stmt = c.prepare_cached(
        "INSERT INTO choices (completion_id, idx, text, token_ids, finish_reason, prompt_index)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for ch in &rec.choices {
        stmt.execute(params![
            rec.id,
            i64::try_from(ch.index).unwrap_or(i64::MAX),
            ch.text,
            serde_json::to_string(&ch.token_ids).unwrap_or_else(|_| "[]".into()),
            ch.finish_reason,
            i64::try_from(ch.prompt_index).unwrap_or(i64::MAX),
        ])?;
    }
    Ok(())
}

/// The `prompt_tokens` column: one prompt's ids as a flat list (what every row before
/// several-prompt requests holds), several prompts as a list of lists.
fn write_prompt_tokens(prompts: &[Vec<u32>]) -> String {
    let json = match prompts {
        [one] => serde_json::to_string(one),
        many => serde_json::to_string(many),
    };
    json.unwrap_or_else(|_| "[]".into())
}

/// Reads [`write_prompt_tokens`]' column back, one list per prompt.
fn read_prompt_tokens(column: &str) -> Result<Vec<Vec<u32>>, serde_json::Error> {
    serde_json::from_str::<Vec<Vec<u32>>>(column)
        .or_else(|_| serde_json::from_str::<Vec<u32>>(column).map(|one| vec![one]))
}

fn update_feedback(
    c: &Connection,
    id: &str,
    fb: &NewFeedback,
    now: i64,
) -> Result<(), FeedbackError> {
    c.prepare_cached(
        "UPDATE feedback SET rating = ?2, correction = coalesce(?3, correction),
             comment = coalesce(?4, comment), updated = ?5
         WHERE id = ?1",
    )?
    .execute(params![
        id,
        fb.rating.as_str(),
        fb.correction,
        fb.comment,
        now
    ])?;
    Ok(())
}

fn remember_key(c: &Connection, fb: &NewFeedback, id: &str) -> Result<(), FeedbackError> {
    if let Some(key) = &fb.idempotency_key {
        c.prepare_cached(
            "INSERT OR IGNORE INTO idempotency_keys (tenant, key, feedback_id) VALUES (?1, ?2, ?3)",
        )?
        .execute(params![fb.tenant, key, id])?;
    }
    Ok(())
}

fn apply_feedback(c: &Connection, fb: &NewFeedback, now: i64) -> Result<Submitted, FeedbackError> {
    let done = |id: String, completion_id: String, choice_index: u32, created: i64, created_now| {
        Submitted {
            id,
            completion_id,
            choice_index,
            rating: fb.rating,
            created: u64::try_from(created).unwrap_or(0),
            created_now,
        }
    };
    if let Some(key) = &fb.idempotency_key {
        let seen = c
            .prepare_cached(
                "SELECT f.id, f.completion_id, f.choice_index, f.created
                 FROM idempotency_keys k JOIN feedback f ON f.id = k.feedback_id
                 WHERE k.tenant = ?1 AND k.key = ?2",
            )?
            .query_row(params![fb.tenant, key], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })
            .optional()?;
        if let Some((id, cid, idx, created)) = seen {
            if cid != fb.completion_id || idx != i64::from(fb.choice_index) {
                return Err(FeedbackError::IdempotencyKeyReused {
                    key: key.clone(),
                    completion_id: cid,
                    choice_index: u32::try_from(idx).unwrap_or(u32::MAX),
                });
            }
            update_feedback(c, &id, fb, now)?;
            return Ok(done(id, cid, fb.choice_index, created, false));
        }
    }
    let choices: Option<i64> = c
        .prepare_cached(
            "SELECT (SELECT count(*) FROM choices WHERE completion_id = c.id)
             FROM completions c WHERE c.id = ?1 AND c.tenant = ?2",
        )?
        .query_row(params![fb.completion_id, fb.tenant], |r| r.get(0))
        .optional()?;
    let Some(choices) = choices else {
        return Err(FeedbackError::CompletionNotFound(fb.completion_id.clone()));
    };
    if i64::from(fb.choice_index) >= choices {
        return Err(FeedbackError::ChoiceOutOfRange {
            index: fb.choice_index,
            choices: u32::try_from(choices).unwrap_or(u32::MAX),
        });
    }
    let existing = c
        .prepare_cached(
            "SELECT id, created FROM feedback WHERE completion_id = ?1 AND choice_index = ?2",
        )?
        .query_row(params![fb.completion_id, fb.choice_index], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })
        .optional()?;
    if let Some((id, created)) = existing {
        update_feedback(c, &id, fb, now)?;
        remember_key(c, fb, &id)?;
        return Ok(done(
            id,
            fb.completion_id.clone(),
            fb.choice_index,
            created,
            false,
        ));
    }
    let id = crate::random_id("fb-");
    c.prepare_cached(
        "INSERT INTO feedback (id, completion_id, choice_index, rating, correction, comment,
             created, updated)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
    )?
    .execute(params![
        id,
        fb.completion_id,
        fb.choice_index,
        fb.rating.as_str(),
        fb.correction,
        fb.comment,
        now
    ])?;
    remember_key(c, fb, &id)?;
    Ok(done(
        id,
        fb.completion_id.clone(),
        fb.choice_index,
        now,
        true,
    ))
}

fn mark_trained(
    c: &Connection,
    tenant: &str,
    adapter: &str,
    keys: &[ExampleKey],
    version: u32,
    now: i64,
) -> Result<u64, FeedbackError> {
    let mut stmt = c.prepare_cached(
        "INSERT OR IGNORE INTO trained (tenant, adapter, example_key, version, created)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    let mut added = 0;
    for k in keys {
        added += stmt.execute(params![tenant, adapter, k.0, version, now])? as u64;
    }
    Ok(added)
}

fn delete_adapter(c: &Connection, tenant: &str, adapter: &str) -> Result<Deleted, FeedbackError> {
    let feedback: i64 = c.query_row(
        "SELECT count(*) FROM feedback f JOIN completions c ON c.id = f.completion_id
         WHERE c.tenant = ?1 AND c.adapter = ?2",
        params![tenant, adapter],
        |r| r.get(0),
    )?;
    let completions = c.execute(
        "DELETE FROM completions WHERE tenant = ?1 AND adapter = ?2",
        params![tenant, adapter],
    )?;
    c.execute(
        "DELETE FROM trained WHERE tenant = ?1 AND adapter = ?2",
        params![tenant, adapter],
    )?;
    Ok(Deleted {
        completions: completions as u64,
        feedback: feedback as u64,
    })
}

fn import(
    c: &Connection,
    tenant: &str,
    adapter: &str,
    examples: &[ImportExample],
    now: i64,
) -> Result<u64, FeedbackError> {
    let insert_fb =
        |completion_id: &str, index: u32, rating: Rating| -> Result<(), FeedbackError> {
            c.prepare_cached(
                "INSERT INTO feedback (id, completion_id, choice_index, rating, created, updated)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            )?
            .execute(params![
                crate::random_id("fb-"),
                completion_id,
                index,
                rating.as_str(),
                now
            ])?;
            Ok(())
        };
    for ex in examples {
        let (prompt, outputs): (&Prompt, Vec<(&str, Rating)>) = match ex {
            ImportExample::Preference {
                prompt,
                chosen,
                rejected,
            } => (prompt, vec![(chosen, Rating::Up), (rejected, Rating::Down)]),
            ImportExample::Demonstration { prompt, completion } => {
                (prompt, vec![(completion, Rating::Up)])
            }
        };
        let endpoint = match prompt {
            Prompt::Chat(_) => "chat.completions",
            Prompt::Text(_) | Prompt::Tokens(_) => "completions",
        };
        let rec = CompletionRecord {
            id: crate::random_id("import-"),
            tenant: tenant.to_string(),
            model: "import".into(),
            adapter_version: adapter.to_string(),
            endpoint,
            request: serde_json::to_value(prompt)
                .map_err(|e| FeedbackError::InvalidData(e.to_string()))?,
            params: serde_json::json!({}),
            prompt_tokens: Vec::new(),
            choices: outputs
                .iter()
                .enumerate()
                .map(|(index, (text, _))| RecordedChoice {
                    index,
                    prompt_index: 0,
                    text: text.to_string(),
                    token_ids: Vec::new(),
                    finish_reason: "stop".into(),
                })
                .collect(),
            user: None,
            created: u64::try_from(now).unwrap_or(0),
            ttft_secs: 0.0,
            duration_secs: 0.0,
        };
        insert_record(c, &rec, "import")?;
        for (i, (_, rating)) in outputs.iter().enumerate() {
            insert_fb(&rec.id, i as u32, *rating)?;
        }
    }
    Ok(examples.len() as u64)
}

/// Deletes served completions older than `keep` that nobody gave feedback on.
fn purge(c: &Connection, keep: Duration) -> Result<usize, FeedbackError> {
    let cutoff = crate::unix_now().saturating_sub(keep.as_secs());
    Ok(c.execute(
        "DELETE FROM completions WHERE created < ?1 AND source = 'served'
           AND NOT EXISTS (SELECT 1 FROM feedback f WHERE f.completion_id = completions.id)",
        params![i64::try_from(cutoff).unwrap_or(i64::MAX)],
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::feedback::Message;

    fn store(dir: &tempfile::TempDir) -> SqliteFeedbackStore {
        SqliteFeedbackStore::open(StoreOptions {
            path: dir.path().join("nested/dir/feedback.sqlite"),
            retention: None,
        })
        .expect("open")
    }

    fn record(
        id: &str,
        tenant: &str,
        version: &str,
        user: &str,
        outputs: &[&str],
    ) -> CompletionRecord {
        CompletionRecord {
            id: id.into(),
            tenant: tenant.into(),
            model: "m".into(),
            adapter_version: version.into(),
            endpoint: "chat.completions",
            request: serde_json::json!([{"role": "user", "content": user}]),
            params: serde_json::json!({"temperature": 0.0}),
            prompt_tokens: vec![vec![1, 2, 3]],
            choices: outputs
                .iter()
                .enumerate()
                .map(|(index, t)| RecordedChoice {
                    index,
                    prompt_index: 0,
                    text: t.to_string(),
                    token_ids: vec![7, 8],
                    finish_reason: "stop".into(),
                })
                .collect(),
            user: Some("u1".into()),
            created: 1_700_000_000,
            ttft_secs: 0.01,
            duration_secs: 0.1,
        }
    }

    fn fb(tenant: &str, id: &str, index: u32, rating: Rating) -> NewFeedback {
        NewFeedback {
            tenant: tenant.into(),
            completion_id: id.into(),
            choice_index: index,
            rating,
            correction: None,
            comment: None,
            idempotency_key: None,
        }
    }

    fn run<T: Send + 'static>(f: StoreFuture<T>) -> Result<T, FeedbackError> {
        SqliteFeedbackStore::blocking(f)
    }

    #[test]
    fn threads_opening_one_fresh_file_together_all_succeed() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().expect("tmp");
            let path = dir.path().join("feedback.sqlite");
            let handles: Vec<_> = (0..6)
                .map(|_| {
                    let path = path.clone();
                    std::thread::spawn(move || {
                        SqliteFeedbackStore::open(StoreOptions {
                            path,
                            retention: None,
                        })
                        .map(|_| ())
                    })
                })
                .collect();
            for h in handles {
                let r = h.join().expect("thread");
                assert!(r.is_ok(), "{r:?}");
            }
        }
    }

    #[test]
    fn a_fresh_path_is_created_in_wal_mode() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        assert!(s.path().is_file());
        let mode: String = s
            .read(|c| Ok(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?))
            .expect("mode");
        assert_eq!(mode, "wal");
    }

    #[test]
    fn records_round_trip_and_stay_with_their_tenant() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        let rec = record("chatcmpl-1", "acme", "support@2", "hi", &["Hello", "Hey"]);
        run(s.record(rec.clone()).map_err_into()).expect("recorded");
        assert_eq!(s.get("acme", "chatcmpl-1"), Some(rec));
        assert_eq!(s.get("globex", "chatcmpl-1"), None);
    }

    #[test]
    fn each_choice_of_a_several_prompt_completion_pairs_under_its_own_prompt() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        let mut rec = record("cmpl-1", "acme", "base", "unused", &["4", "5", "6", "7"]);
        rec.endpoint = "completions";
        rec.request = serde_json::json!(["2+2=", "3+3="]);
        rec.prompt_tokens = vec![vec![17, 18], vec![19]];
        for ch in &mut rec.choices {
            ch.prompt_index = ch.index / 2; // n = 2
        }
        run(s.record(rec.clone()).map_err_into()).expect("recorded");
        assert_eq!(s.get("acme", "cmpl-1"), Some(rec));
        run(s.submit(fb("acme", "cmpl-1", 1, Rating::Down))).expect("fb");
        run(s.submit(fb("acme", "cmpl-1", 3, Rating::Up))).expect("fb");
        let rated = s.rated_outputs("acme", "base").expect("rated");
        let seen: Vec<(u32, Prompt, &str)> = rated
            .iter()
            .map(|r| (r.choice_index, r.prompt.clone(), r.output.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (1, Prompt::Text("2+2=".into()), "5"),
                (3, Prompt::Text("3+3=".into()), "7"),
            ]
        );
    }

    #[test]
    fn feedback_is_idempotent_and_updates_the_rating() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        run(s
            .record(record("c1", "acme", "base", "hi", &["a", "b"]))
            .map_err_into())
        .expect("rec");
        let first = run(s.submit(fb("acme", "c1", 0, Rating::Up))).expect("first");
        assert!(first.created_now);
        let again = run(s.submit(fb("acme", "c1", 0, Rating::Down))).expect("again");
        assert!(!again.created_now);
        assert_eq!(again.id, first.id);
        assert_eq!(run(s.stats("acme", "base")).expect("stats").down, 1);
        let mut keyed = fb("acme", "c1", 1, Rating::Up);
        keyed.idempotency_key = Some("k1".into());
        let k1 = run(s.submit(keyed.clone())).expect("keyed");
        assert!(k1.created_now);
        let k2 = run(s.submit(keyed.clone())).expect("keyed again");
        assert_eq!((k2.id.as_str(), k2.created_now), (k1.id.as_str(), false));
        keyed.choice_index = 0;
        assert!(matches!(
            run(s.submit(keyed)),
            Err(FeedbackError::IdempotencyKeyReused { .. })
        ));
    }

    #[test]
    fn unknown_foreign_and_out_of_range_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        run(s
            .record(record("c1", "acme", "base", "hi", &["a"]))
            .map_err_into())
        .expect("rec");
        assert!(matches!(
            run(s.submit(fb("acme", "nope", 0, Rating::Up))),
            Err(FeedbackError::CompletionNotFound(_))
        ));
        assert!(matches!(
            run(s.submit(fb("globex", "c1", 0, Rating::Up))),
            Err(FeedbackError::CompletionNotFound(_))
        ));
        assert_eq!(
            run(s.submit(fb("acme", "c1", 1, Rating::Up))),
            Err(FeedbackError::ChoiceOutOfRange {
                index: 1,
                choices: 1
            })
        );
    }

    #[test]
    fn concurrent_writes_share_commits_and_all_land() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("rt");
        let ids: Vec<String> = rt.block_on(async {
            let outputs: Vec<&str> = vec!["x"; 8];
            let mut recs = Vec::new();
            for i in 0..50 {
                recs.push(s.record(record(&format!("c{i}"), "acme", "base", "hi", &outputs)));
            }
            for r in futures_util::future::join_all(recs).await {
                r.expect("record");
            }
            let mut subs = Vec::new();
            for i in 0..50 {
                for j in 0..8 {
                    subs.push(s.submit(fb("acme", &format!("c{i}"), j, Rating::Up)));
                }
            }
            futures_util::future::join_all(subs)
                .await
                .into_iter()
                .map(|r| r.expect("submit").id)
                .collect()
        });
        let unique: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(unique.len(), 400);
        assert_eq!(run(s.stats("acme", "base")).expect("stats").up, 400);
    }

    #[test]
    fn delete_removes_one_adapters_data_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        run(s
            .record(record("c1", "acme", "support@1", "hi", &["a"]))
            .map_err_into())
        .expect("rec");
        run(s
            .record(record("c2", "acme", "base", "hi", &["a"]))
            .map_err_into())
        .expect("rec");
        run(s.submit(fb("acme", "c1", 0, Rating::Up))).expect("fb");
        run(s.submit(fb("acme", "c2", 0, Rating::Up))).expect("fb");
        let d = run(s.delete_adapter("acme", "support")).expect("delete");
        assert_eq!(
            d,
            Deleted {
                completions: 1,
                feedback: 1
            }
        );
        assert_eq!(s.get("acme", "c1"), None);
        assert!(s.get("acme", "c2").is_some());
        assert_eq!(run(s.stats("acme", "base")).expect("stats").up, 1);
    }

    #[test]
    fn imported_examples_pair_and_marks_reduce_untrained() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        let prompt = Prompt::Chat(vec![Message {
            role: "user".into(),
            content: "Say hi".into(),
        }]);
        let n = run(s.import(
            "acme",
            "support",
            vec![
                ImportExample::Preference {
                    prompt: prompt.clone(),
                    chosen: "Hi!".into(),
                    rejected: "No.".into(),
                },
                ImportExample::Demonstration {
                    prompt: Prompt::Text("2+2=".into()),
                    completion: "4".into(),
                },
            ],
        ))
        .expect("import");
        assert_eq!(n, 2);
        let ex = run(s.training_examples("acme", "support")).expect("examples");
        assert_eq!(ex.pairs.len(), 1);
        assert_eq!(
            (ex.pairs[0].chosen.as_str(), ex.pairs[0].rejected.as_str()),
            ("Hi!", "No.")
        );
        assert_eq!(ex.demonstrations.len(), 2);
        let stats = run(s.stats("acme", "support")).expect("stats");
        assert_eq!(stats.untrained, 3);
        let added =
            run(s.mark_trained("acme", "support", vec![ex.pairs[0].key.clone()], 2)).expect("mark");
        assert_eq!(added, 1);
        let stats = run(s.stats("acme", "support")).expect("stats");
        assert_eq!(
            (stats.untrained, stats.pairs, stats.up, stats.down),
            (2, 1, 2, 1)
        );
        let ex = run(s.training_examples("acme", "support")).expect("examples");
        assert_eq!(ex.pairs[0].trained_in, vec![2]);
    }

    #[test]
    fn data_survives_reopening() {
        let dir = tempfile::tempdir().expect("tmp");
        let id = {
            let s = store(&dir);
            run(s
                .record(record("c1", "acme", "base", "hi", &["a"]))
                .map_err_into())
            .expect("rec");
            let id = run(s.submit(fb("acme", "c1", 0, Rating::Down)))
                .expect("fb")
                .id;
            s.close();
            id
        };
        let s = store(&dir);
        let again = run(s.submit(fb("acme", "c1", 0, Rating::Down))).expect("fb");
        assert_eq!(again.id, id);
        assert!(!again.created_now);
    }

    #[test]
    fn purge_keeps_completions_with_feedback() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = store(&dir);
        run(s
            .record(record("old", "acme", "base", "hi", &["a"]))
            .map_err_into())
        .expect("rec");
        run(s
            .record(record("rated", "acme", "base", "hi", &["a"]))
            .map_err_into())
        .expect("rec");
        run(s.submit(fb("acme", "rated", 0, Rating::Up))).expect("fb");
        let n = s
            .read(|c| purge(c, Duration::from_secs(60)))
            .expect("purge");
        assert_eq!(n, 1);
        assert_eq!(s.get("acme", "old"), None);
        assert!(s.get("acme", "rated").is_some());
    }

    /// Turns a record acknowledgement into a store future for the helpers above.
    trait MapErrInto {
        fn map_err_into(self) -> StoreFuture<()>;
    }

    impl MapErrInto for RecordAck {
        fn map_err_into(self) -> StoreFuture<()> {
            Box::pin(async move { self.await.map_err(|e| FeedbackError::Storage(e.0)) })
        }
    }
}
