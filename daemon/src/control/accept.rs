//! Accepting connections: the connection limit and the allowlist (uids and gids, read with
//! `SO_PEERCRED`; see [`crate::access`]). A peer that is refused is told why (one `Error` with
//! request id 0) before its connection is closed.

use super::*;

impl Reactor {
    pub(super) fn accept(&mut self) {
        loop {
            match rustix::net::accept_with(
                &self.listener,
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok(fd) => {
                    if self.conns.len() >= self.config.max_connections {
                        self.refused
                            .note("connection limit reached, refusing clients");
                        let max = self.config.max_connections;
                        turn_away(
                            fd,
                            ErrorCode::LimitExceeded,
                            format!(
                                "this vmpagerd already serves its maximum of {max} connections \
                                 (--max-connections); try again later"
                            ),
                        );
                        continue;
                    }
                    let peer = rustix::net::sockopt::socket_peercred(&fd).ok();
                    let ids = peer.as_ref().map(|p| (p.uid.as_raw(), p.gid.as_raw()));
                    if !ids.is_some_and(|(uid, gid)| self.config.allow.admits(uid, gid)) {
                        self.refused
                            .note("a peer whose uid and gid are not allowed was refused");
                        turn_away(
                            fd,
                            ErrorCode::PermissionDenied,
                            crate::access::Allowlist::refusal(ids),
                        );
                        continue;
                    }
                    let token = self.next_token;
                    self.next_token += 1;
                    if let Err(e) = self.poll.registry().register(
                        &mut SourceFd(&fd.as_raw_fd()),
                        Token(token),
                        Interest::READABLE,
                    ) {
                        tracing::warn!(error = %e, "cannot poll a connection");
                        continue;
                    }
                    tracing::debug!(
                        token,
                        pid = peer.as_ref().map(|p| p.pid.as_raw_nonzero().get()),
                        uid = peer.as_ref().map(|p| p.uid.as_raw()),
                        gid = peer.as_ref().map(|p| p.gid.as_raw()),
                        "client connected"
                    );
                    self.conns.insert(
                        token,
                        Conn {
                            socket: Connection::from_fd(fd),
                            state: State::Greeting,
                            peer,
                            bad_in_a_row: 0,
                            subscriptions: Vec::new(),
                        },
                    );
                    crate::metrics::VmMetrics::bump(&self.live.metrics().connections_accepted);
                }
                Err(rustix::io::Errno::AGAIN) => return,
                Err(rustix::io::Errno::INTR | rustix::io::Errno::CONNABORTED) => continue,
                Err(e) => {
                    // EMFILE and friends: keep serving existing clients.
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
    }
}

/// Tells a peer the daemon will not serve why, with one `Error` (request id 0: it answers
/// whatever the peer sent or will send), and closes the connection. The socket is new and
/// non-blocking: the reply fits, and a peer that is already gone is not waited for.
fn turn_away(fd: OwnedFd, code: ErrorCode, text: String) {
    let conn = Connection::from_fd(fd);
    let _ = conn.send(&Message::Error(ErrorReply { code, text }), 0, &[]);
}
