//! A deployment's record (SPEC §4 deploy), as the API shows it and the state
//! file keeps it, and what a restart of cutover makes of one that was running.
//! [`crate::controller`] runs the steps.

use serde::{Deserialize, Serialize};

/// One step of a deployment.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// `set_target`, `wait_healthy`, `smoke`, `switch`, `drain`, `watch`.
    pub name: String,
    /// `pending`, `running`, `succeeded`, `failed`, `skipped`.
    pub state: String,
    /// When it started (RFC 3339).
    pub started_at: Option<String>,
    /// When it finished.
    pub finished_at: Option<String>,
    /// What happened.
    pub message: Option<String>,
}

/// A deployment and its steps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Deployment {
    /// Its id.
    pub id: String,
    /// The site.
    pub site: String,
    /// The target deployed to.
    pub target: String,
    /// The version deployed.
    pub version: Option<String>,
    /// `running`, `succeeded`, `failed` (never went live) or `rolled_back`.
    pub state: String,
    /// The steps, in order.
    pub steps: Vec<Step>,
    /// Why it failed or was rolled back.
    pub error: Option<String>,
}

impl Deployment {
    /// Whether it has not ended.
    pub fn is_running(&self) -> bool {
        self.state == "running"
    }

    /// Ends, at `now`, what a restart of cutover cut short: a deployment that
    /// had not gone live `failed`; one that had is `rolled_back` when `live`
    /// is another target, and else `succeeded`, unless its watch resumes
    /// (`watch_resumes`): then it runs on, its watch step with it. Its target
    /// live counts as gone live: the switch is saved before its step is.
    pub fn after_restart(&mut self, live: &str, watch_resumes: bool, now: &str) {
        if !self.is_running() {
            return;
        }
        let switched = self.steps.iter().any(|s| s.name == "switch" && s.state == "succeeded");
        let went_live = switched || live == self.target;
        let started = self.steps.iter().any(|s| s.state != "pending");
        let cut = self.steps.iter().find(|s| matches!(s.state.as_str(), "pending" | "running")).map(|s| s.name.clone());
        // Only the steps cutover runs, in its order, go on after a restart.
        let watch_last = self.steps.iter().position(|s| s.name == "watch") == Some(5) && self.steps.len() == 6;
        let resumes = went_live && live == self.target && watch_resumes && watch_last;
        for s in &mut self.steps {
            match s.state.as_str() {
                "running" | "pending" if !switched && went_live && s.name == "switch" => {
                    s.state = "succeeded".into();
                    s.finished_at = Some(now.to_string());
                    s.message = Some(format!("{} is live (cutover restarted as it switched)", self.target));
                }
                "running" | "pending" if resumes && s.name == "watch" => {
                    s.state = "running".into();
                    s.started_at.get_or_insert_with(|| now.to_string());
                    s.message = Some("resumed after a restart of cutover".into());
                }
                "running" => {
                    s.state = "skipped".into();
                    s.finished_at = Some(now.to_string());
                    s.message = Some("cutover restarted before this step ended".into());
                }
                "pending" => {
                    s.state = "skipped".into();
                    s.finished_at = Some(now.to_string());
                    s.message = Some("cutover restarted before this step".into());
                }
                _ => {}
            }
        }
        if resumes {
            return;
        }
        let during = match cut {
            _ if !started => " before it started".to_string(),
            Some(step) => format!(" during the {step} step"),
            None => String::new(),
        };
        (self.state, self.error) = match (went_live, live == self.target) {
            (false, _) => {
                ("failed".into(), Some(format!("cutover restarted{during}; {} did not go live", self.target)))
            }
            (true, false) => ("rolled_back".into(), Some(format!("cutover restarted{during}, and {live} is live"))),
            (true, true) => ("succeeded".into(), None),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment(done: &[&str]) -> Deployment {
        let names = ["set_target", "wait_healthy", "smoke", "switch", "drain", "watch"];
        let steps = names
            .iter()
            .enumerate()
            .map(|(i, name)| Step {
                name: name.to_string(),
                state: match i.cmp(&done.len()) {
                    std::cmp::Ordering::Less => done[i].to_string(),
                    std::cmp::Ordering::Equal => "running".into(),
                    std::cmp::Ordering::Greater => "pending".into(),
                },
                started_at: None,
                finished_at: None,
                message: None,
            })
            .collect();
        Deployment {
            id: "d1".into(),
            site: "shop".into(),
            target: "green".into(),
            version: None,
            state: "running".into(),
            steps,
            error: None,
        }
    }

    fn states(d: &Deployment) -> Vec<&str> {
        d.steps.iter().map(|s| s.state.as_str()).collect()
    }

    #[test]
    fn one_that_had_not_gone_live_failed() {
        let mut d = deployment(&["succeeded"]);
        d.after_restart("blue", true, "now");
        assert_eq!(d.state, "failed");
        assert_eq!(d.error.as_deref(), Some("cutover restarted during the wait_healthy step; green did not go live"));
        assert_eq!(states(&d), ["succeeded", "skipped", "skipped", "skipped", "skipped", "skipped"]);
        assert_eq!(d.steps[1].message.as_deref(), Some("cutover restarted before this step ended"));
    }

    #[test]
    fn one_that_had_gone_live_follows_its_resumed_watch() {
        let mut d = deployment(&["succeeded", "succeeded", "skipped", "succeeded"]);
        d.after_restart("green", true, "now");
        assert_eq!(d.state, "running");
        assert_eq!(states(&d), ["succeeded", "succeeded", "skipped", "succeeded", "skipped", "running"]);
        assert_eq!(d.steps[5].message.as_deref(), Some("resumed after a restart of cutover"));
        assert_eq!(d.steps[5].started_at.as_deref(), Some("now"));
    }

    #[test]
    fn one_that_had_gone_live_without_a_watch_to_resume_succeeded() {
        let mut d = deployment(&["succeeded", "succeeded", "skipped", "succeeded", "succeeded"]);
        d.after_restart("green", false, "now");
        assert_eq!((d.state.as_str(), d.error.as_deref()), ("succeeded", None));
        assert_eq!(states(&d)[5], "skipped");
    }

    #[test]
    fn one_that_had_gone_live_and_is_not_live_was_rolled_back() {
        let mut d = deployment(&["succeeded", "succeeded", "skipped", "succeeded", "succeeded"]);
        d.after_restart("blue", true, "now");
        assert_eq!(d.state, "rolled_back");
        assert_eq!(d.error.as_deref(), Some("cutover restarted during the watch step, and blue is live"));
    }

    /// Killed between the switch's save and its step's: its target is live.
    #[test]
    fn one_whose_target_is_live_went_live_though_its_switch_step_was_not_saved() {
        let mut d = deployment(&["succeeded", "succeeded", "skipped"]);
        d.after_restart("green", true, "now");
        assert_eq!(d.state, "running");
        assert_eq!(states(&d), ["succeeded", "succeeded", "skipped", "succeeded", "skipped", "running"]);
        let mut d = deployment(&["succeeded", "succeeded", "skipped"]);
        d.after_restart("green", false, "now");
        assert_eq!((d.state.as_str(), d.steps[3].state.as_str()), ("succeeded", "succeeded"));
    }

    /// A record of other steps than cutover's (a hand-edited file) does not run on.
    #[test]
    fn a_record_of_other_steps_does_not_resume() {
        let mut d = deployment(&["succeeded", "succeeded", "skipped", "succeeded"]);
        d.steps.truncate(5);
        d.after_restart("green", true, "now");
        assert_eq!(d.state, "succeeded");
    }

    #[test]
    fn one_that_waited_for_its_turn_failed_before_it_started() {
        let mut d = deployment(&[]);
        d.steps[0].state = "pending".into();
        d.after_restart("blue", false, "now");
        assert_eq!(d.state, "failed");
        assert_eq!(d.error.as_deref(), Some("cutover restarted before it started; green did not go live"));
    }

    #[test]
    fn one_that_ended_is_left_as_it_is() {
        let mut d = deployment(&["succeeded", "failed", "skipped", "skipped", "skipped", "skipped"]);
        d.state = "failed".into();
        let before = d.clone();
        d.after_restart("blue", false, "now");
        assert_eq!(d, before);
    }
}
