//! The open-file limit. Every client connection takes a file descriptor and,
//! while a request of it is forwarded, an upstream one. `serve` raises the
//! soft `RLIMIT_NOFILE` to the hard limit (as Go's runtime and HAProxy do),
//! and when even that cannot hold `limits.max_connections` it serves fewer
//! connections, so the data plane cannot take the descriptors that the admin
//! API, health checks and the state file need.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Descriptors kept back for listeners, the admin API, health checks and state saves.
const RESERVE: u64 = 256;

/// What Linux allows at most when the hard limit is "unlimited" (`fs.nr_open`'s default).
const NR_OPEN: u64 = 1 << 20;

/// Raises the soft open-file limit to the hard one, and returns how many
/// client connections fit under it: `max_connections`, or fewer (with a
/// warning) when each could not have its upstream connection too.
pub fn fit(max_connections: usize) -> usize {
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(NR_OPEN);
    let mut soft = limit.current.unwrap_or(NR_OPEN);
    if soft < hard {
        match setrlimit(Resource::Nofile, Rlimit { current: Some(hard), maximum: limit.maximum }) {
            Ok(()) => {
                tracing::debug!(from = soft, to = hard, "raised the open-file limit to its hard limit");
                soft = hard;
            }
            Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit"),
        }
    }
    let fits = usize::try_from(soft.saturating_sub(RESERVE) / 2).unwrap_or(usize::MAX).max(1);
    if fits >= max_connections {
        return max_connections;
    }
    tracing::warn!(
        max_connections,
        open_file_limit = soft,
        serving_at_most = fits,
        "limits.max_connections needs about {} file descriptors (a client and an upstream connection each, \
         and {RESERVE} for the rest) but the open-file limit is {soft}: serving at most {fits} connections; \
         raise the limit (ulimit -n, or LimitNOFILE= in a systemd unit)",
        2 * max_connections as u64 + RESERVE,
    );
    fits
}
