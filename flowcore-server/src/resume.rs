//! Resume URLs: `run.resume_urls.<signal>` in templates, an address under
//! `/webhooks/resume/` that delivers one signal to one run without an API key (an approval
//! link in an email). This module makes and checks them; `routes::resume` serves them.
//!
//! A token is `{run id}.{signal}.{mac}`: the MAC is [`Keyring::sign`] of the run id and the
//! signal, so a token is valid for that run and that signal only, cannot be guessed, and needs
//! no table of its own. It delivers only while the run waits for that signal (409
//! `not_waiting` otherwise). The URL is a credential: whoever holds it chooses the payload, and
//! a template that renders it leaves it in the step's output (readable with the `read` scope);
//! the request logs leave its path out.

use std::sync::Arc;

use flowcore::RunId;

use crate::keyring::Keyring;

/// Where resume tokens are made and checked.
pub struct ResumeLinks {
    /// `{FLOWCORE_PUBLIC_URL}/webhooks/resume/`.
    base: String,
    keys: Arc<Keyring>,
}

impl std::fmt::Debug for ResumeLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeLinks")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

fn message(run_id: &str, signal: &str) -> Vec<u8> {
    format!("resume\0{run_id}\0{signal}").into_bytes()
}

impl ResumeLinks {
    /// Links under `public_url`, signed with `keys`.
    pub fn new(public_url: &str, keys: Arc<Keyring>) -> Self {
        Self {
            base: format!("{}/webhooks/resume/", public_url.trim_end_matches('/')),
            keys,
        }
    }

    /// The run and signal of a token, when it is one of ours.
    pub fn open(&self, token: &str) -> Option<(RunId, String)> {
        let (run_id, rest) = token.split_once('.')?;
        let (signal, mac) = rest.rsplit_once('.')?;
        let ok = flowcore::nodes::is_signal_name(signal)
            && run_id.len() <= 64
            && self.keys.verify(&message(run_id, signal), mac);
        ok.then(|| (RunId::from(run_id), signal.to_owned()))
    }
}

impl flowcore::wait::ResumeUrls for ResumeLinks {
    fn url(&self, run_id: &RunId, signal: &str) -> String {
        let mac = self.keys.sign(&message(run_id.as_str(), signal));
        format!("{}{run_id}.{signal}.{mac}", self.base)
    }
}

/// Where resume URLs live.
pub const PREFIX: &str = "/webhooks/resume/";
