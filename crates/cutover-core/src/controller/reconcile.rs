//! Merging durable state with the configuration: what survives a restart or a reload.

use std::collections::BTreeMap;
use std::time::SystemTime;

use cutover_config::{Config, Site, Target};

use crate::history::{self, HistoryEntry};
use crate::state::{SiteState, State, STATE_VERSION};

/// The targets of a site: those of the configuration, with API-set ones laid over.
pub(crate) fn effective_targets(site: &Site, state: &SiteState) -> BTreeMap<String, Target> {
    let mut targets = site.targets.clone();
    for (name, spec) in &state.targets {
        let t = targets.entry(name.clone()).or_default();
        t.endpoints = spec.endpoints.clone();
        t.version = spec.version.clone();
    }
    targets
}

/// Merges loaded state with the configuration: stale entries are dropped with a warning.
pub(crate) fn reconcile(config: &Config, loaded: Option<State>) -> State {
    let mut loaded = loaded.unwrap_or_default();
    let mut state = State { version: STATE_VERSION, sites: BTreeMap::new() };
    for name in loaded.sites.keys() {
        if !config.sites.iter().any(|s| &s.name == name) {
            tracing::warn!(site = %name, "state has a site the configuration no longer has; dropped");
        }
    }
    for site in &config.sites {
        let mut s = loaded
            .sites
            .remove(&site.name)
            .unwrap_or_else(|| SiteState { live: site.live.clone(), ..Default::default() });
        // A target the configuration defined goes with it, endpoints set
        // through the API or not; one only the API defined stays.
        s.targets.retain(|name, spec| {
            let defined = site.targets.contains_key(name);
            if spec.configured && !defined {
                tracing::warn!(site = %site.name, target = %name, "state has a target the configuration no longer has; dropped");
                return false;
            }
            spec.configured |= defined;
            true
        });
        let known = |t: &str, s: &SiteState| site.targets.contains_key(t) || s.targets.contains_key(t);
        if !known(&s.live, &s) {
            tracing::warn!(site = %site.name, target = %s.live, "state's live target no longer exists; using the configured live target");
            let gone = std::mem::replace(&mut s.live, site.live.clone());
            let entry = HistoryEntry::now("switch", Some(&gone), Some(&s.live), "reload", "ok")
                .reason(format!("target {gone:?} is no longer configured"));
            history::push(&mut s.history, entry);
        }
        if let Some(p) = s.previous.clone() {
            if !known(&p, &s) {
                tracing::warn!(site = %site.name, target = %p, "state's previous target no longer exists; dropped");
                s.previous = None;
            } else if p == s.live {
                tracing::warn!(site = %site.name, target = %p, "state's previous target is now the live one; dropped");
                s.previous = None;
            }
        }
        if let Some(w) = &s.weights {
            if w.keys().any(|t| !known(t, &s)) {
                tracing::warn!(site = %site.name, "state's weights name a target that no longer exists; dropped");
                s.weights = None;
                let entry = HistoryEntry::now("weights", None, None, "reload", "ok")
                    .reason("cleared: they named a target that is no longer configured");
                history::push(&mut s.history, entry);
            }
        }
        if let Some(w) = &s.watch {
            if w.target != s.live || s.previous.as_ref() != Some(&w.previous) {
                tracing::warn!(site = %site.name, target = %w.target, "state's post-switch watch no longer applies; dropped");
                s.watch = None;
            } else if w.left_at(SystemTime::now()).is_none() {
                tracing::info!(site = %site.name, target = %w.target, "state's post-switch watch is over; dropped");
                s.watch = None;
            }
        }
        state.sites.insert(site.name.clone(), s);
    }
    state
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::TargetSpec;

    fn config() -> Config {
        let yaml = r#"
listen: { http: 127.0.0.1:0 }
sites:
  - name: shop
    hosts: [shop.test]
    live: blue
    targets:
      blue: { endpoints: [127.0.0.1:1] }
      green: { endpoints: [127.0.0.1:2] }
"#;
        cutover_config::parse(yaml, std::path::Path::new(".")).unwrap()
    }

    fn site_state(live: &str, previous: Option<&str>) -> SiteState {
        SiteState { live: live.into(), previous: previous.map(Into::into), ..Default::default() }
    }

    #[test]
    fn without_state_the_configured_live_target_is_used() {
        let state = reconcile(&config(), None);
        assert_eq!(state.sites["shop"].live, "blue");
        assert_eq!(state.version, STATE_VERSION);
    }

    #[test]
    fn state_wins_over_the_configuration() {
        let mut loaded = State { version: STATE_VERSION, ..Default::default() };
        loaded.sites.insert("shop".into(), site_state("green", Some("blue")));
        let state = reconcile(&config(), Some(loaded));
        assert_eq!(state.sites["shop"].live, "green");
        assert_eq!(state.sites["shop"].previous.as_deref(), Some("blue"));
    }

    #[test]
    fn stale_sites_and_targets_are_dropped() {
        let mut loaded = State { version: STATE_VERSION, ..Default::default() };
        loaded.sites.insert("gone".into(), site_state("blue", None));
        let mut shop = site_state("purple", Some("orange"));
        shop.weights = Some([("blue".to_string(), 50), ("mauve".to_string(), 50)].into());
        loaded.sites.insert("shop".into(), shop);
        let state = reconcile(&config(), Some(loaded));
        assert!(!state.sites.contains_key("gone"));
        let shop = &state.sites["shop"];
        assert_eq!(shop.live, "blue");
        assert_eq!(shop.previous, None);
        assert_eq!(shop.weights, None);
    }

    #[test]
    fn targets_set_through_the_api_are_kept() {
        let mut loaded = State { version: STATE_VERSION, ..Default::default() };
        let mut shop = site_state("clone", Some("blue"));
        let spec = TargetSpec { endpoints: vec!["127.0.0.1:3".into()], version: None, configured: false };
        shop.targets.insert("clone".into(), spec.clone());
        shop.targets.insert("green".into(), spec);
        loaded.sites.insert("shop".into(), shop);
        let state = reconcile(&config(), Some(loaded));
        assert_eq!(state.sites["shop"].live, "clone");
        let targets = effective_targets(&config().sites[0], &state.sites["shop"]);
        assert_eq!(targets.keys().collect::<Vec<_>>(), ["blue", "clone", "green"]);
        // The configuration defines green: that is noted, clone only the API defined.
        let kept = &state.sites["shop"].targets;
        assert!(kept["green"].configured && !kept["clone"].configured);
    }

    /// A configured target that the API set goes when the configuration
    /// drops it (with what the configuration said of it, such as
    /// `read_only`), and the live and previous entries naming it with it.
    #[test]
    fn a_configured_target_set_through_the_api_goes_with_the_configuration() {
        let mut loaded = State { version: STATE_VERSION, ..Default::default() };
        let mut shop = site_state("orange", Some("blue"));
        let spec = TargetSpec { endpoints: vec!["127.0.0.1:3".into()], version: None, configured: true };
        shop.targets.insert("orange".into(), spec);
        loaded.sites.insert("shop".into(), shop);
        let state = reconcile(&config(), Some(loaded));
        let shop = &state.sites["shop"];
        assert!(shop.targets.is_empty());
        assert_eq!((shop.live.as_str(), shop.previous.as_deref()), ("blue", None));
    }

    /// A saved watch is resumed only while it has time left and still
    /// watches the live target, with the previous one to roll back to.
    #[test]
    fn a_saved_watch_stays_only_while_it_applies() {
        use crate::state::WatchState;
        let watch = |target: &str, ago: u64, secs: u64| WatchState {
            target: target.into(),
            previous: "blue".into(),
            started_at: humantime::format_rfc3339_millis(SystemTime::now() - std::time::Duration::from_secs(ago))
                .to_string(),
            duration: std::time::Duration::from_secs(secs),
        };
        let kept = |w: WatchState, previous: Option<&str>| {
            let mut loaded = State { version: STATE_VERSION, ..Default::default() };
            let mut shop = site_state("green", previous);
            shop.watch = Some(w);
            loaded.sites.insert("shop".into(), shop);
            reconcile(&config(), Some(loaded)).sites["shop"].watch.is_some()
        };
        assert!(kept(watch("green", 10, 60), Some("blue")));
        assert!(!kept(watch("green", 70, 60), Some("blue")), "its time is over");
        assert!(!kept(watch("blue", 10, 60), Some("blue")), "it watches a target that is not live");
        assert!(!kept(watch("green", 10, 60), None), "nothing to roll back to");
        let mut odd = watch("green", 10, 60);
        odd.started_at = "yesterday".into();
        assert!(!kept(odd, Some("blue")), "a start that cannot be read");
    }
}
