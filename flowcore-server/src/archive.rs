//! The archive (`FLOWCORE_ARCHIVE=true`): the runs that retention deletes are first written to
//! the blob store (S3 in the topology), so that a year of history costs the price of object
//! storage, not of the database.
//!
//! Each pruning batch writes gzipped JSON lines (one [`ArchivedRun`] a line), one object per
//! day and flow, under `archive/{day}/{flow}/{first id}_{last id}.jsonl.gz`. The day and the
//! order are those of the run ids (UUIDv7: they sort by creation time), so that
//! [`find`] needs nothing but the id: the id gives the day, the objects' names give the ids
//! they hold, and the one object that may hold the run is read a line at a time.
//!
//! A crash between the write and the delete archives the batch again on the next pass: the
//! same runs give the same object name, so the object is written over, not doubled. Two
//! processes archiving at once may write a run twice, in two objects; [`find`] takes the
//! first.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;

use flowcore::durable::resolve;
use flowcore::ports::{BlobStore, RunRecord, RunStore};
use flowcore::{RunId, StepRecord, StoreError};
use serde::{Deserialize, Serialize};

/// Where archived runs go in the blob store.
pub const PREFIX: &str = "archive/";

/// The uncompressed JSON one object holds at most: a batch of larger runs makes several.
const OBJECT_BYTES: usize = 8 << 20;

/// A run as archived: its record and steps, with the outputs that had gone to the blob store
/// read back in (those blobs are deleted with the run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivedRun {
    /// The run.
    pub run: RunRecord,
    /// Its steps.
    pub steps: Vec<StepRecord>,
}

/// Writes the runs `ids` to the archive, read from `runs` (a run gone since is left out).
/// Returns how many were written. The runs are still in the store when this returns; the
/// caller deletes them after.
pub async fn write(
    runs: &dyn RunStore,
    blobs: &dyn BlobStore,
    ids: &[RunId],
) -> Result<usize, StoreError> {
    // One object open per day and flow; all are written out whenever together they hold
    // `OBJECT_BYTES`, so that a batch of large runs never sits in memory whole.
    let mut open: BTreeMap<(String, String), Object> = BTreeMap::new();
    let (mut buffered, mut written) = (0, 0);
    for id in ids {
        let run = match runs.get(id).await {
            Ok(run) => run,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e),
        };
        let steps = runs.steps(id).await?;
        let archived = read_back(run, steps, blobs).await;
        let day = day_of(id).unwrap_or_else(|| archived.run.created_at.format("%F").to_string());
        buffered += open
            .entry((day, archived.run.flow_id.clone()))
            .or_default()
            .push(&archived)?;
        if buffered >= OBJECT_BYTES {
            written += put_all(&mut open, blobs).await?;
            buffered = 0;
        }
    }
    written += put_all(&mut open, blobs).await?;
    Ok(written)
}

/// Writes out every open object. Returns how many runs they held.
async fn put_all(
    open: &mut BTreeMap<(String, String), Object>,
    blobs: &dyn BlobStore,
) -> Result<usize, StoreError> {
    let mut written = 0;
    for ((day, flow), object) in open.iter_mut() {
        written += object.put(blobs, day, flow).await?;
    }
    Ok(written)
}

/// The run with its offloaded outputs read back in. An output whose blob cannot be read keeps
/// its reference (and a warning is logged): the archive must not stop retention.
async fn read_back(
    mut run: RunRecord,
    mut steps: Vec<StepRecord>,
    blobs: &dyn BlobStore,
) -> ArchivedRun {
    let read = async |value: &serde_json::Value| match resolve(value, blobs).await {
        Ok(value) => value,
        Err(e) => {
            tracing::warn!(run_id = %run.id, error = %e, "reading an offloaded output to archive failed");
            value.clone()
        }
    };
    let output = match &run.output {
        Some(output) => Some(read(output).await),
        None => None,
    };
    for step in &mut steps {
        if let Some(output) = &step.output {
            step.output = Some(Arc::new(read(output).await));
        }
    }
    run.output = output;
    ArchivedRun { run, steps }
}

/// The JSON lines of one object being built, and the least and greatest ids it holds.
#[derive(Default)]
struct Object {
    lines: Vec<u8>,
    first: Option<RunId>,
    last: Option<RunId>,
}

impl Object {
    /// Adds a run's line; returns its length.
    fn push(&mut self, archived: &ArchivedRun) -> Result<usize, StoreError> {
        let before = self.lines.len();
        serde_json::to_writer(&mut self.lines, archived)
            .map_err(|e| StoreError::backend("encoding a run to archive", e))?;
        self.lines.push(b'\n');
        let id = &archived.run.id;
        if self.first.as_ref().is_none_or(|first| id < first) {
            self.first = Some(id.clone());
        }
        if self.last.as_ref().is_none_or(|last| id > last) {
            self.last = Some(id.clone());
        }
        Ok(self.lines.len() - before)
    }

    /// Compresses and stores the lines, and starts over. Returns how many runs they held.
    async fn put(
        &mut self,
        blobs: &dyn BlobStore,
        day: &str,
        flow: &str,
    ) -> Result<usize, StoreError> {
        let taken = std::mem::take(self);
        let (Some(first), Some(last)) = (taken.first, taken.last) else {
            return Ok(0);
        };
        let runs = taken.lines.iter().filter(|b| **b == b'\n').count();
        let lines = taken.lines;
        let gzipped = tokio::task::spawn_blocking(move || {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            encoder.write_all(&lines)?;
            encoder.finish()
        })
        .await
        .map_err(|e| StoreError::backend("compressing an archive", e))?
        .map_err(|e| StoreError::backend("compressing an archive", e))?;
        let key = format!("{PREFIX}{day}/{flow}/{first}_{last}.jsonl.gz");
        blobs.put(&key, gzipped).await?;
        Ok(runs)
    }
}

/// The day (`YYYY-MM-DD`, UTC) a UUIDv7 run id was made.
fn day_of(id: &RunId) -> Option<String> {
    id.created_at().map(|at| at.format("%F").to_string())
}

/// The first and last run ids an archive object's name says it holds.
fn range_of(key: &str) -> Option<(&str, &str)> {
    key.rsplit('/')
        .next()?
        .strip_suffix(".jsonl.gz")?
        .split_once('_')
}

/// The archived run `id`, if the archive holds it: one listing of the id's day, and a read of
/// the objects whose range holds the id (one, unless two processes archived at once).
pub async fn find(blobs: &dyn BlobStore, id: &RunId) -> Result<Option<ArchivedRun>, StoreError> {
    let Some(day) = day_of(id) else {
        return Ok(None);
    };
    for key in blobs.list(&format!("{PREFIX}{day}/")).await? {
        let Some((first, last)) = range_of(&key) else {
            continue;
        };
        if !(first..=last).contains(&id.as_str()) {
            continue;
        }
        let gzipped = blobs.get(&key).await?;
        let wanted = id.clone();
        let found = tokio::task::spawn_blocking(move || scan(&gzipped, &wanted))
            .await
            .map_err(|e| StoreError::backend("reading an archive", e))??;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// The line of run `id` in a gzipped archive object, read a line at a time.
fn scan(gzipped: &[u8], id: &RunId) -> Result<Option<ArchivedRun>, StoreError> {
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(gzipped));
    for line in reader.lines() {
        let line = line.map_err(|e| StoreError::backend("reading an archive", e))?;
        // A cheap look first: most lines are other runs.
        if !line.contains(id.as_str()) {
            continue;
        }
        let archived: ArchivedRun = serde_json::from_str(&line)
            .map_err(|e| StoreError::backend("decoding an archived run", e))?;
        if archived.run.id == *id {
            return Ok(Some(archived));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use flowcore::ports::memory::{MemoryBlobStore, MemoryRunStore};
    use flowcore::ports::{NewRun, RunStore};
    use flowcore::{RunStatus, StepStatus};
    use serde_json::json;

    use super::*;

    /// Three finished runs of two flows.
    async fn finished_runs(runs: &MemoryRunStore) -> Vec<RunId> {
        let mut ids = Vec::new();
        for flow in ["a", "a", "b"] {
            let (run, _) = runs
                .create(NewRun::new(flow, 1, json!({"n": ids.len()})))
                .await
                .unwrap();
            runs.transition(&run.id, RunStatus::Queued, RunStatus::Cancelled)
                .await
                .unwrap();
            ids.push(run.id);
        }
        ids
    }

    #[tokio::test]
    async fn archived_runs_are_found_by_id_alone_and_archiving_again_writes_over() {
        let (runs, blobs) = (MemoryRunStore::new(), MemoryBlobStore::new());
        let ids = finished_runs(&runs).await;
        assert_eq!(write(&runs, &blobs, &ids).await.unwrap(), 3);
        let objects = blobs.list(PREFIX).await.unwrap();
        assert_eq!(objects.len(), 2, "one object per day and flow: {objects:?}");
        for key in &objects {
            assert!(
                key.ends_with(".jsonl.gz") && range_of(key).is_some(),
                "{key}"
            );
        }
        // As after a crash between the write and the delete: the same objects, written over.
        assert_eq!(write(&runs, &blobs, &ids).await.unwrap(), 3);
        assert_eq!(blobs.list(PREFIX).await.unwrap(), objects);
        runs.delete_finished(&ids).await.unwrap();
        for (n, id) in ids.iter().enumerate() {
            let found = find(&blobs, id).await.unwrap().expect("archived");
            assert_eq!(found.run.id, *id);
            assert_eq!(found.run.input, json!({"n": n}));
            assert_eq!(found.run.status, RunStatus::Cancelled);
        }
        assert!(find(&blobs, &RunId::new()).await.unwrap().is_none());
        assert!(
            find(&blobs, &RunId::from("../../etc"))
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn offloaded_outputs_are_read_back_into_the_archive() {
        let (runs, blobs) = (MemoryRunStore::new(), MemoryBlobStore::new());
        blobs
            .put(
                "runs/r/n",
                serde_json::to_vec(&json!({"big": "x".repeat(1000)})).unwrap(),
            )
            .await
            .unwrap();
        let reference = json!({flowcore::durable::BLOB_REF: "runs/r/n", "size": 1012});
        let step = StepRecord {
            node: "n".into(),
            status: StepStatus::Succeeded,
            attempts: 1,
            started_at: None,
            finished_at: None,
            output: Some(Arc::new(reference.clone())),
            error: None,
            port: None,
        };
        let (run, _) = runs.create(NewRun::new("f", 1, json!({}))).await.unwrap();
        let archived = read_back(run, vec![step.clone()], &blobs).await;
        assert_eq!(
            archived.steps[0].output.as_deref(),
            Some(&json!({"big": "x".repeat(1000)}))
        );
        // A blob that is gone keeps its reference: the archive does not stop retention.
        blobs.delete("runs/r/n").await.unwrap();
        let archived = read_back(archived.run, vec![step], &blobs).await;
        assert_eq!(archived.steps[0].output.as_deref(), Some(&reference));
    }
}
