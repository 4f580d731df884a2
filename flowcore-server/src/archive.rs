//! The archive (`FLOWCORE_ARCHIVE=true`): the runs that retention deletes are first written to
//! the blob store (S3 in the topology), so that a year of history costs the price of object
//! storage, not of the database.
//!
//! Each pruning batch writes gzipped JSON lines (one [`ArchivedRun`] a line), one object per
//! flow and hour, under `archive/{day}/{hour}/{flow}/{least id}_{greatest id}_{n}.jsonl.gz`
//! (`n` unique to the write). The day, hour and order are those of the run ids (UUIDv7: they
//! sort by creation time), so that [`find`] needs nothing but the id: the id gives the hour,
//! the objects' names give the ids they hold, and only the objects that may hold the run are
//! read, a line at a time.
//!
//! An object is never written over: a crash between the write and the delete archives the
//! batch again next pass, and two processes archiving at once may both write a run; the run is
//! then in two objects, the same in both, and [`find`] takes the first. Nothing is lost either
//! way (writing over could replace an object with one that holds fewer runs).

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::sync::Arc;

use flowcore::durable::resolve;
use flowcore::ports::{BlobStore, RunAction, RunRecord, RunStore};
use flowcore::{RunId, StepRecord, StoreError};
use serde::{Deserialize, Serialize};

/// Where archived runs go in the blob store.
pub const PREFIX: &str = "archive/";

/// The uncompressed JSON one object holds at most: a batch of larger runs makes several. (One
/// run may be larger: its stored outputs are bounded by the run log limit, 50 MB.)
const OBJECT_BYTES: usize = 8 << 20;

/// The objects one lookup reads at most. A run is in one (two after a crash or concurrent
/// archivers); more objects cover an id only when many flows ran in that hour.
const OBJECTS_PER_LOOKUP: usize = 16;

/// Lookups in the archive at once in this process: each lists an hour and reads objects of up
/// to [`OBJECT_BYTES`], and an API caller chooses the ids.
static LOOKUPS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

/// The version of the lines' format ([`ArchivedRun::format`]).
const FORMAT: u32 = 1;

/// A run as archived: its record (without its lease) and steps, with the outputs that had gone
/// to the blob store read back in (those blobs are deleted with the run).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ArchivedRun {
    /// The version of this format: 1.
    pub format: u32,
    /// The run.
    pub run: RunRecord,
    /// Its steps.
    pub steps: Vec<StepRecord>,
    /// What people did to it (absent from lines archived before it was recorded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<RunAction>,
}

/// Writes the runs `ids` to the archive, read from `runs` (a run gone since is left out).
/// Returns how many were written. The runs are still in the store when this returns; the
/// caller deletes them after.
pub async fn write(
    runs: &dyn RunStore,
    blobs: &dyn BlobStore,
    ids: &[RunId],
) -> Result<usize, StoreError> {
    // One object open per hour and flow; all are written out whenever together they hold
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
        let mut archived = read_back(run, steps, blobs).await?;
        archived.actions = runs.actions(id).await?;
        let hour =
            hour_of(id).unwrap_or_else(|| archived.run.created_at.format("%F/%H").to_string());
        buffered += open
            .entry((hour, archived.run.flow_id.clone()))
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
    for ((hour, flow), object) in open.iter_mut() {
        written += object.put(blobs, hour, flow).await?;
    }
    Ok(written)
}

/// The run with its offloaded outputs read back in. An output whose blob is gone keeps its
/// reference (and a warning is logged): it cannot come back, and the archive must not stop
/// retention for it. Any other failure fails the batch, which the next pass tries again.
async fn read_back(
    mut run: RunRecord,
    mut steps: Vec<StepRecord>,
    blobs: &dyn BlobStore,
) -> Result<ArchivedRun, StoreError> {
    let id = run.id.clone();
    let read = async |value: &serde_json::Value| match resolve(value, blobs).await {
        Err(StoreError::NotFound { .. }) => {
            tracing::warn!(run_id = %id, "an offloaded output to archive is gone; its reference stays");
            Ok(value.clone())
        }
        other => other,
    };
    if let Some(output) = &run.output {
        run.output = Some(read(output).await?);
    }
    for step in &mut steps {
        if let Some(output) = &step.output {
            step.output = Some(Arc::new(read(output).await?));
        }
    }
    run.lease = None;
    Ok(ArchivedRun {
        format: FORMAT,
        run,
        steps,
        actions: Vec::new(),
    })
}

/// The JSON lines of one object being built, and the least and greatest ids it holds.
#[derive(Default)]
struct Object {
    lines: Vec<u8>,
    least: Option<RunId>,
    greatest: Option<RunId>,
}

impl Object {
    /// Adds a run's line; returns its length.
    fn push(&mut self, archived: &ArchivedRun) -> Result<usize, StoreError> {
        let before = self.lines.len();
        serde_json::to_writer(&mut self.lines, archived)
            .map_err(|e| StoreError::backend("encoding a run to archive", e))?;
        self.lines.push(b'\n');
        let id = &archived.run.id;
        if self.least.as_ref().is_none_or(|least| id < least) {
            self.least = Some(id.clone());
        }
        if self.greatest.as_ref().is_none_or(|greatest| id > greatest) {
            self.greatest = Some(id.clone());
        }
        Ok(self.lines.len() - before)
    }

    /// Compresses and stores the lines under a name of its own, and starts over. Returns how
    /// many runs they held.
    async fn put(
        &mut self,
        blobs: &dyn BlobStore,
        hour: &str,
        flow: &str,
    ) -> Result<usize, StoreError> {
        let taken = std::mem::take(self);
        let (Some(least), Some(greatest)) = (taken.least, taken.greatest) else {
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
        let unique = flowcore::ids::new_id();
        let key = format!("{PREFIX}{hour}/{flow}/{least}_{greatest}_{unique}.jsonl.gz");
        blobs.put(&key, gzipped).await?;
        Ok(runs)
    }
}

/// The day and hour (`YYYY-MM-DD/HH`, UTC) a UUIDv7 run id was made.
fn hour_of(id: &RunId) -> Option<String> {
    id.created_at().map(|at| at.format("%F/%H").to_string())
}

/// The least and greatest run ids an archive object's name says it holds.
fn range_of(key: &str) -> Option<(&str, &str)> {
    let mut parts = key
        .rsplit('/')
        .next()?
        .strip_suffix(".jsonl.gz")?
        .split('_');
    Some((parts.next()?, parts.next()?))
}

/// The archived run `id`, if the archive holds it: one listing of the id's hour, and a read of
/// the objects whose range holds the id (at most [`OBJECTS_PER_LOOKUP`]; a few lookups at a
/// time per process).
pub async fn find(blobs: &dyn BlobStore, id: &RunId) -> Result<Option<ArchivedRun>, StoreError> {
    let Some(hour) = hour_of(id) else {
        return Ok(None);
    };
    let _turn = LOOKUPS
        .acquire()
        .await
        .map_err(|e| StoreError::backend("waiting to read the archive", e))?;
    let keys = blobs.list(&format!("{PREFIX}{hour}/")).await?;
    let covering = keys.iter().filter(|key| {
        range_of(key).is_some_and(|(least, greatest)| (least..=greatest).contains(&id.as_str()))
    });
    for key in covering.take(OBJECTS_PER_LOOKUP) {
        let gzipped = blobs.get(key).await?;
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
        // A line that does not decode (damaged, or of a format this version does not know)
        // is passed over: the other runs of the object stay readable.
        match serde_json::from_str::<ArchivedRun>(&line) {
            Ok(archived) if archived.run.id == *id => return Ok(Some(archived)),
            Ok(_) => {}
            Err(e) => tracing::warn!(run_id = %id, error = %e, "an archived line does not decode"),
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
            runs.transition(&run.id, RunStatus::Queued.to(RunStatus::Cancelled))
                .await
                .unwrap();
            let cancel = RunAction::now(flowcore::ports::ActionKind::Cancel, None);
            runs.record_actions(&[(run.id.clone(), cancel)])
                .await
                .unwrap();
            ids.push(run.id);
        }
        ids
    }

    /// The flows of the archive's objects.
    async fn flows_of(blobs: &MemoryBlobStore) -> Vec<String> {
        let mut flows: Vec<String> = blobs
            .list(PREFIX)
            .await
            .unwrap()
            .iter()
            .map(|key| key.rsplit('/').nth(1).unwrap().to_owned())
            .collect();
        flows.sort();
        flows.dedup();
        flows
    }

    #[tokio::test]
    async fn archived_runs_are_found_by_id_alone_and_nothing_is_written_over() {
        let (runs, blobs) = (MemoryRunStore::new(), MemoryBlobStore::new());
        let ids = finished_runs(&runs).await;
        assert_eq!(write(&runs, &blobs, &ids).await.unwrap(), 3);
        let objects = blobs.list(PREFIX).await.unwrap();
        assert_eq!(
            flows_of(&blobs).await,
            ["a", "b"],
            "objects per flow: {objects:?}"
        );
        for key in &objects {
            assert!(
                key.ends_with(".jsonl.gz") && range_of(key).is_some(),
                "{key}"
            );
        }
        // As after a crash between the write and the delete, or a second archiver that saw
        // only some of the runs: more objects, none written over.
        assert_eq!(write(&runs, &blobs, &ids[1..]).await.unwrap(), 2);
        assert_eq!(blobs.list(PREFIX).await.unwrap().len(), objects.len() + 2);
        runs.delete_finished(&ids).await.unwrap();
        for (n, id) in ids.iter().enumerate() {
            let found = find(&blobs, id).await.unwrap().expect("archived");
            assert_eq!(found.run.id, *id);
            assert_eq!(found.run.input, json!({"n": n}));
            assert_eq!(found.run.status, RunStatus::Cancelled);
            assert_eq!(found.actions.len(), 1, "with who cancelled it");
            assert_eq!(found.format, FORMAT);
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
    async fn a_line_that_does_not_decode_leaves_the_others_readable() {
        let (runs, blobs) = (MemoryRunStore::new(), MemoryBlobStore::new());
        let ids = finished_runs(&runs).await;
        let good = ArchivedRun {
            format: FORMAT,
            run: runs.get(&ids[0]).await.unwrap(),
            steps: Vec::new(),
            actions: Vec::new(),
        };
        let mut lines =
            format!("{{\"format\": 1, \"run\": {{\"id\": \"{}\"}}}}\n", ids[0]).into_bytes();
        lines.extend(serde_json::to_vec(&good).unwrap());
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(&lines).unwrap();
        let hour = hour_of(&ids[0]).unwrap();
        let key = format!("{PREFIX}{hour}/a/{}_{}_x.jsonl.gz", ids[0], ids[0]);
        blobs.put(&key, encoder.finish().unwrap()).await.unwrap();
        let found = find(&blobs, &ids[0]).await.unwrap().expect("the good line");
        assert_eq!(found.run.input, json!({"n": 0}));
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
            status: StepStatus::Succeeded,
            attempts: 1,
            output: Some(Arc::new(reference.clone())),
            ..StepRecord::pending("n")
        };
        let (run, _) = runs.create(NewRun::new("f", 1, json!({}))).await.unwrap();
        let archived = read_back(run, vec![step.clone()], &blobs).await.unwrap();
        assert_eq!(
            archived.steps[0].output.as_deref(),
            Some(&json!({"big": "x".repeat(1000)}))
        );
        // A blob that is gone keeps its reference: the archive does not stop retention for it.
        blobs.delete("runs/r/n").await.unwrap();
        let archived = read_back(archived.run, vec![step], &blobs).await.unwrap();
        assert_eq!(archived.steps[0].output.as_deref(), Some(&reference));
    }
}
