//! The runs executing in this process, so that a cancel can reach them and a shutdown can wait
//! for them. A run's entry belongs to one [`Slot`]: registered when the slot is made, removed
//! when it is dropped, however the run's execution ends.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use flowcore::{CancellationToken, RunId};

/// The registry of runs executing here.
#[derive(Debug, Default, Clone)]
pub struct Running(Arc<Mutex<HashMap<RunId, CancellationToken>>>);

/// A run's place in the [`Running`] registry, with its cancellation token; dropping it removes
/// the run.
#[derive(Debug)]
pub struct Slot {
    registry: Running,
    id: RunId,
    token: CancellationToken,
}

impl Slot {
    /// The token that cancels the run.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
    /// The run's id.
    pub fn run_id(&self) -> &RunId {
        &self.id
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.registry.runs().remove(&self.id);
    }
}

impl Running {
    fn runs(&self) -> MutexGuard<'_, HashMap<RunId, CancellationToken>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a run about to execute here (before it is claimed, so that a cancel arriving
    /// in between is not lost), unless it is registered already (another delivery of its job):
    /// then `None`, and the registration is left alone.
    pub fn enter(&self, id: &RunId) -> Option<Slot> {
        let mut runs = self.runs();
        if runs.contains_key(id) {
            return None;
        }
        let token = CancellationToken::new();
        runs.insert(id.clone(), token.clone());
        Some(Slot {
            registry: self.clone(),
            id: id.clone(),
            token,
        })
    }
    /// How many runs execute here.
    pub fn len(&self) -> usize {
        self.runs().len()
    }
    /// Whether no run executes here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Cancels a run executing here; `false` when it is not here.
    pub fn cancel(&self, id: &RunId) -> bool {
        match self.runs().get(id) {
            Some(token) => {
                token.cancel();
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_owns_its_entry_and_a_second_delivery_leaves_it_alone() {
        let running = Running::default();
        let id = RunId::new();
        let first = running.enter(&id).expect("registered");
        assert!(running.enter(&id).is_none(), "already here");
        assert!(running.cancel(&id));
        assert!(
            first.token().is_cancelled(),
            "a cancel reaches the first registration"
        );
        assert_eq!(running.len(), 1);
        drop(first);
        assert!(running.is_empty(), "dropping the slot removes the run");
        assert!(!running.cancel(&id));
        assert!(running.enter(&id).is_some(), "free again once removed");
    }
}
