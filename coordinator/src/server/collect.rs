//! Stage 2, collect: route delta chunks, reassemble uploads, hand complete ones to the
//! verification workers ([`crate::ingest`]), group-commit what they accept, then receipt and
//! acknowledge it, until every registered client is in or the deadline passes.
//!
//! MQTT acknowledgements go out in the order the packets came in: a packet is acknowledged only
//! once everything it carried is settled — for the last chunk of an upload, once the upload is
//! durable and receipted (accepted) or receipted as rejected. A crash before that makes the
//! broker deliver it again.

use super::{Coordinator, RoundBook, RoundEvent, RoundInputs};
use crate::collect::{admit, Admission};
use crate::config::BelowQuorum;
use crate::ingest::{default_workers, Done, Ingest, RoundSpec, Upload};
use crate::report::{CollectReport, LostDelta, ReassemblyReport};
use crate::store::Store;
use crate::verify::{verify_signer, verify_upload, RoundContext};
use crate::CoordinatorError;
use coevo_mqtt::{Incoming, Publish, Session};
use coevo_protocol::chunk::Reassembler;
use coevo_protocol::envelope::{self, Kind};
use coevo_protocol::{
    digest, DeltaChunk, Digest, Receipt, ReceiptOutcome, RejectReason, Signed, Status, StatusState,
    Topic,
};
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Largest client status message decoded (an id, a state, a round and an error line).
const STATUS_LIMIT: usize = 4096;

/// The collect phase's reassembly state, bounded per client (see `collect::admit`).
pub(super) struct CollectState {
    reasm: Reassembler<(String, u64)>,
    /// Signed headers of transfers in `reasm`, never more than it holds transfers.
    headers: HashMap<(String, u64), Signed>,
    chunk_limit: usize,
    /// (client, digest) acknowledged in the previous round, from its journal.
    previous_acks: BTreeSet<(String, String)>,
}

/// Complete uploads between the receive loop and the workers, and the MQTT packets waiting on
/// them.
struct Pipeline {
    ingest: Ingest,
    next_ticket: u64,
    /// Packets in arrival order, each with the upload ticket it waits for (if any).
    acks: VecDeque<(Publish, Option<u64>)>,
    /// Tickets settled (receipted) whose packet is not yet acknowledged.
    settled: HashSet<u64>,
    /// The one upload per client being verified (its ticket).
    verifying: HashMap<String, u64>,
    /// Further complete uploads of a client whose upload is being verified: checked after it
    /// (a re-send then gets the receipt again instead of being verified twice).
    waiting: HashMap<String, VecDeque<(u64, Upload)>>,
    /// Most uploads held in `waiting` per client.
    per_client: usize,
}

/// What collection hands to aggregation.
pub(super) struct Collected {
    pub book: RoundBook,
    /// `completed` or `skipped`.
    pub outcome: &'static str,
    pub extensions: u32,
    pub lost: Vec<LostDelta>,
    pub reassembly: ReassemblyReport,
    pub collect: CollectReport,
}

/// What the loop waits on.
enum Wake {
    Mqtt(Option<Incoming>),
    Verified(Vec<Done>),
    Sweep,
    Deadline,
}

impl Coordinator {
    /// Collects the round's deltas; `published` is republished on reconnects and extensions.
    pub(super) async fn collect_stage(
        &self,
        inputs: &RoundInputs,
        session: &mut Session,
        store: &Store,
        spec: Arc<RoundSpec>,
        published: &mut super::publish::Published,
    ) -> Result<Collected, CoordinatorError> {
        let cfg = &self.cfg;
        let round = inputs.round;
        let mut book = RoundBook::default();
        // Deltas acknowledged before a restart are on disk: take them back, and name any whose
        // stored copy is gone or damaged (its client holds a receipt, so it won't re-send).
        let (recovered, lost) = {
            let ctx = spec.ctx();
            crate::collect::recover(
                store,
                &ctx,
                cfg.transfer.max_delta_bytes as usize + 64 * 1024,
            )?
        };
        for r in recovered {
            self.metrics.accepted(&r.client, r.meta.bytes);
            book.accepted.insert(r.client, r.meta);
        }
        for l in &lost {
            tracing::error!(round, client = %l.client, digest = %l.digest, reason = %l.reason, "an acknowledged delta is lost and cannot be merged");
        }
        let chunk_size = cfg.transfer.chunk_size as usize;
        let max_chunks = (cfg.transfer.max_delta_bytes / cfg.transfer.chunk_size as u64 + 1) as u32;
        // Only registered clients' chunks for this round are held (collect::admit), so the
        // per-client limits times the registry bound the total; `reassembly_bytes` caps it too.
        let per_client = cfg.transfer.uploads_per_client.max(1) as usize;
        let mut st = CollectState {
            reasm: Reassembler::new(
                (inputs.registry.len() * per_client).max(1),
                cfg.transfer.max_delta_bytes as usize,
                max_chunks,
            )
            .with_owner_limits(
                per_client,
                cfg.transfer.per_client_bytes() as usize,
                cfg.transfer.reassembly_bytes as usize,
            ),
            headers: HashMap::new(),
            chunk_limit: chunk_size + 16 * 1024,
            previous_acks: match round {
                1 => BTreeSet::new(),
                r => crate::collect::acknowledged(store, r - 1)?,
            },
        };
        let mut pipe = Pipeline {
            ingest: Ingest::new(spec.clone(), store.clone(), default_workers()),
            next_ticket: 0,
            acks: VecDeque::new(),
            settled: HashSet::new(),
            verifying: HashMap::new(),
            waiting: HashMap::new(),
            per_client,
        };
        let ctx = spec.ctx();
        let max_verifying = cfg.transfer.max_verifying.max(1) as usize;
        let shed_before = session.shed();
        let timeout = Duration::from_secs(cfg.round.timeout_s);
        let mut deadline = tokio::time::Instant::now() + timeout;
        let mut extensions = 0u32;
        let stale = Duration::from_secs(cfg.transfer.stale_transfer_s.max(1));
        let mut sweep = tokio::time::interval(stale.min(Duration::from_secs(10)));
        let outcome = loop {
            if !inputs.registry.is_empty() && book.accepted.len() >= inputs.registry.len() {
                break "completed";
            }
            let busy = pipe.ingest.in_flight() > 0;
            // Backpressure: with the workers full, what the broker delivers waits in the
            // session (bounded by `incoming_bytes`), not in a queue that grows with the fleet.
            let room = pipe.ingest.in_flight() < max_verifying;
            let wake = tokio::select! {
                ev = session.recv(), if room => Wake::Mqtt(ev),
                done = pipe.ingest.recv(), if busy => Wake::Verified(done),
                _ = sweep.tick() => Wake::Sweep,
                _ = tokio::time::sleep_until(deadline) => Wake::Deadline,
            };
            match wake {
                Wake::Sweep => {
                    for key in st.reasm.expire(stale) {
                        tracing::warn!(client = %key.0, round = key.1, "dropping a stale incomplete upload");
                        st.headers.remove(&key);
                    }
                }
                Wake::Verified(done) => {
                    self.settle(session, &ctx, &mut book, &mut pipe, done)
                        .await?;
                }
                Wake::Deadline => {
                    // Uploads that arrived in time count: finish verifying them first.
                    self.drain(session, &ctx, &mut book, &mut pipe).await?;
                    if !inputs.registry.is_empty() && book.accepted.len() >= inputs.registry.len() {
                        break "completed";
                    }
                    if book.accepted.len() >= cfg.round.quorum.max(1) as usize {
                        break "completed";
                    }
                    if cfg.round.below_quorum == BelowQuorum::Extend
                        && extensions < cfg.round.max_extensions
                    {
                        extensions += 1;
                        deadline += timeout;
                        tracing::warn!(
                            round,
                            accepted = book.accepted.len(),
                            quorum = cfg.round.quorum,
                            "below quorum at the deadline: extending"
                        );
                        // Edges drop a manifest whose deadline has passed, so the extension is
                        // signed and published; the model goes again too, which also replaces
                        // any retained chunk a broker lost or let someone overwrite.
                        published.extend(cfg.round.timeout_s * 1000, &cfg.client_id, &self.key);
                        self.metrics
                            .set_deadline(published.manifest.deadline_unix_ms);
                        published.republish(session, &cfg.fleet).await?;
                        continue;
                    }
                    tracing::warn!(
                        round,
                        accepted = book.accepted.len(),
                        quorum = cfg.round.quorum,
                        "below quorum at the deadline: skipping the round"
                    );
                    break "skipped";
                }
                Wake::Mqtt(None) => {
                    return Err(CoordinatorError::Broker("MQTT session ended".into()))
                }
                Wake::Mqtt(Some(Incoming::Connected { session_present })) => {
                    // The broker may have restarted and lost our retained messages.
                    published.republish(session, &cfg.fleet).await?;
                    if !session_present {
                        // A new session (a broker that kept nothing, a cluster node that could
                        // not load ours): the client library dropped our unacknowledged
                        // publishes — receipts among them — and the broker may have lost the
                        // retained ones. Send this round's accepted receipts again, or a camera
                        // whose receipt was in flight never hears of it once the round closes.
                        for (client, meta) in &book.accepted {
                            self.receipt(
                                session,
                                client,
                                round,
                                meta.header.payload_digest,
                                ReceiptOutcome::Accepted,
                            )
                            .await?;
                        }
                        if !book.accepted.is_empty() {
                            tracing::info!(
                                round,
                                receipts = book.accepted.len(),
                                "new broker session: receipts of this round sent again"
                            );
                        }
                    }
                }
                Wake::Mqtt(Some(Incoming::Disconnected(e))) => {
                    tracing::warn!(error = %e, "broker connection lost; reconnecting")
                }
                Wake::Mqtt(Some(Incoming::AuthRefused { error, consecutive })) => {
                    tracing::error!(%error, consecutive, "cannot reconnect; retrying")
                }
                Wake::Mqtt(Some(Incoming::Shed(p))) => {
                    // Dropped unread by the session (we were behind); its client re-sends.
                    pipe.acks.push_back((p, None));
                    flush_acks(session, &mut pipe).await?;
                }
                Wake::Mqtt(Some(Incoming::Publish(p))) => {
                    let wait = match self.on_chunk(&p, &mut st, &mut book, session, &ctx).await? {
                        Some((client, upload_round, header, payload)) => {
                            let up = Upload {
                                client,
                                round: upload_round,
                                header,
                                payload,
                            };
                            self.dispatch(session, &ctx, &mut book, &mut pipe, up)
                                .await?
                        }
                        None => None,
                    };
                    // Only once any accepted delta is on disk does the broker hear we have it.
                    pipe.acks.push_back((p, wait));
                    flush_acks(session, &mut pipe).await?;
                }
            }
        };
        self.drain(session, &ctx, &mut book, &mut pipe).await?;
        st.headers.clear();
        st.reasm.retain(|k| k.1 > round);
        book.rejected = book.tally.counts();
        let peaks = st.reasm.peaks();
        Ok(Collected {
            outcome,
            extensions,
            lost,
            reassembly: ReassemblyReport {
                peak_bytes: peaks.bytes as u64,
                peak_transfers: peaks.transfers as u64,
                peak_client_bytes: peaks.owner_bytes as u64,
                refused_busy: book.refused_busy,
            },
            collect: CollectReport {
                shed: session.shed() - shed_before,
                ..pipe.ingest.stats.clone()
            },
            book,
        })
    }

    /// A complete upload: to the workers, behind the client's upload being verified, or (for a
    /// client already accepted) answered at once. Returns the ticket its packet waits for.
    async fn dispatch(
        &self,
        session: &Session,
        ctx: &RoundContext<'_>,
        book: &mut RoundBook,
        pipe: &mut Pipeline,
        up: Upload,
    ) -> Result<Option<u64>, CoordinatorError> {
        self.metrics.upload(&up.client);
        if book.accepted.contains_key(&up.client) {
            self.on_upload_after_accept(ctx, session, book, up).await?;
            return Ok(None);
        }
        let ticket = pipe.next_ticket;
        pipe.next_ticket += 1;
        if pipe.verifying.contains_key(&up.client) {
            let q = pipe.waiting.entry(up.client.clone()).or_default();
            if q.len() >= pipe.per_client {
                // Not the sender's doing to blame: it re-sends on its backoff.
                book.refused_busy += 1;
                return Ok(None);
            }
            q.push_back((ticket, up));
            return Ok(Some(ticket));
        }
        pipe.verifying.insert(up.client.clone(), ticket);
        pipe.ingest.submit(ticket, up);
        Ok(Some(ticket))
    }

    /// Waits for every upload still being verified and settles it.
    async fn drain(
        &self,
        session: &Session,
        ctx: &RoundContext<'_>,
        book: &mut RoundBook,
        pipe: &mut Pipeline,
    ) -> Result<(), CoordinatorError> {
        while pipe.ingest.in_flight() > 0 {
            let done = pipe.ingest.recv().await;
            self.settle(session, ctx, book, pipe, done).await?;
        }
        flush_acks(session, pipe).await
    }

    /// Settles a batch of finished verifications: rejections are receipted at once; accepted
    /// deltas are made durable together (one group commit), then receipted in a burst, then
    /// their packets acknowledged.
    async fn settle(
        &self,
        session: &Session,
        ctx: &RoundContext<'_>,
        book: &mut RoundBook,
        pipe: &mut Pipeline,
        done: Vec<Done>,
    ) -> Result<(), CoordinatorError> {
        let mut accepted = Vec::new();
        for d in done {
            let client = d.upload.client;
            pipe.verifying.remove(&client);
            match d.outcome? {
                Ok(meta) => accepted.push((d.ticket, client, meta)),
                Err(r) => {
                    self.reject(
                        session,
                        book,
                        &client,
                        true,
                        d.upload.round,
                        r.digest,
                        r.reason,
                        r.signed,
                    )
                    .await?;
                    pipe.settled.insert(d.ticket);
                    // The client's next complete upload, if one came meanwhile.
                    if let Some(q) = pipe.waiting.get_mut(&client) {
                        if let Some((t, up)) = q.pop_front() {
                            pipe.verifying.insert(client.clone(), t);
                            pipe.ingest.submit(t, up);
                        }
                        if q.is_empty() {
                            pipe.waiting.remove(&client);
                        }
                    }
                }
            }
        }
        let batch: Vec<(String, Digest)> = accepted
            .iter()
            .map(|(_, c, m)| (c.clone(), m.header.payload_digest))
            .collect();
        // Durable before acknowledged: the delta files (fsync'd by the workers), their
        // directory and their journal lines (what a restarted coordinator checks the deltas
        // against); a crash after this loses nothing, and a lost file is named.
        pipe.ingest.commit(batch).await?;
        for (ticket, client, meta) in accepted {
            let payload_digest = meta.header.payload_digest;
            self.metrics.accepted(&client, meta.bytes);
            book.accepted.insert(client.clone(), meta);
            self.receipt(
                session,
                &client,
                ctx.round,
                payload_digest,
                ReceiptOutcome::Accepted,
            )
            .await?;
            pipe.settled.insert(ticket);
            tracing::debug!(round = ctx.round, client = %client, accepted = book.accepted.len(), "delta accepted");
            self.emit(RoundEvent::Accepted {
                round: ctx.round,
                client: client.clone(),
                accepted: book.accepted.len(),
            });
            // Uploads of this client that came while it was verified: re-sends or conflicts.
            for (t, up) in pipe.waiting.remove(&client).unwrap_or_default() {
                self.on_upload_after_accept(ctx, session, book, up).await?;
                pipe.settled.insert(t);
            }
        }
        flush_acks(session, pipe).await
    }

    /// A complete upload from a client whose delta is already accepted this round: the same
    /// digest is a re-send (its receipt was lost) and gets the receipt again, counted once;
    /// anything else is rejected. (Normally caught chunk by chunk in `on_resend`.)
    async fn on_upload_after_accept(
        &self,
        ctx: &RoundContext<'_>,
        session: &Session,
        book: &mut RoundBook,
        up: Upload,
    ) -> Result<(), CoordinatorError> {
        let Upload {
            client,
            round: upload_round,
            header,
            payload,
        } = up;
        let payload_digest = digest(&payload);
        let signer = header
            .as_ref()
            .and_then(|h| verify_signer(ctx.registry, &client, h).ok());
        if let Some(hd) = signer.as_ref().filter(|hd| hd.round == ctx.round) {
            let prev = book.accepted.get(&client).map(|a| a.header.payload_digest);
            if prev == Some(payload_digest) {
                book.resent += 1;
                return self
                    .receipt(
                        session,
                        &client,
                        hd.round,
                        payload_digest,
                        ReceiptOutcome::Accepted,
                    )
                    .await;
            }
            return self
                .reject(
                    session,
                    book,
                    &client,
                    true,
                    hd.round,
                    payload_digest,
                    RejectReason::ConflictingUpload,
                    true,
                )
                .await;
        }
        // Unsigned or for another round: say exactly what is wrong with it.
        let reason = match verify_upload(ctx, &client, header.as_ref(), &payload) {
            Err(reason) => reason,
            Ok(_) => RejectReason::ConflictingUpload,
        };
        self.reject(
            session,
            book,
            &client,
            true,
            upload_round,
            payload_digest,
            reason,
            signer.is_some(),
        )
        .await
    }

    /// Handles one delta chunk; returns a complete upload when its last chunk arrives. Nothing
    /// is held for a chunk [`admit`] turns away, and a flood costs one log line per client and
    /// reason per round.
    async fn on_chunk(
        &self,
        p: &Publish,
        st: &mut CollectState,
        book: &mut RoundBook,
        session: &Session,
        ctx: &RoundContext<'_>,
    ) -> Result<Option<(String, u64, Option<Signed>, Vec<u8>)>, CoordinatorError> {
        let round = ctx.round;
        let (client, t_round, t_index) = match Topic::parse(&self.cfg.fleet, &p.topic) {
            Ok(Topic::DeltaChunk {
                client,
                round,
                index,
            }) => (client, round, index),
            Ok(Topic::Status { client }) => {
                self.on_status(ctx, &client, &p.payload);
                return Ok(None);
            }
            Ok(_) => return Ok(None),
            Err(e) => {
                tracing::debug!(topic = %p.topic, error = %e, "ignoring message");
                return Ok(None);
            }
        };
        let registered = ctx.registry.key(&client).is_some();
        let no_digest = Digest([0; 32]);
        match admit(
            t_round,
            round,
            registered,
            book.accepted.contains_key(&client),
        ) {
            Admission::Take => {}
            Admission::UnknownClient => {
                let r = RejectReason::UnknownClient;
                self.reject(session, book, &client, false, round, no_digest, r, false)
                    .await?;
                return Ok(None);
            }
            Admission::Future => {
                let r = RejectReason::WrongRound {
                    got: t_round,
                    current: round,
                };
                self.reject(session, book, &client, true, round, no_digest, r, false)
                    .await?;
                return Ok(None);
            }
            Admission::Late => {
                self.on_late(p, st, book, session, ctx, &client, t_round, t_index)
                    .await?;
                return Ok(None);
            }
            Admission::Resend => {
                self.on_resend(p, st, book, session, ctx, &client, t_index)
                    .await?;
                return Ok(None);
            }
        }
        let mut chunk: DeltaChunk =
            match envelope::decode(&p.payload, Kind::DeltaChunk, st.chunk_limit) {
                Ok(c) => c,
                Err(e) => {
                    let reason = RejectReason::Malformed(format!("delta chunk: {e}"));
                    self.reject_unsigned(session, book, &client, round, &p.payload, reason)
                        .await?;
                    return Ok(None);
                }
            };
        if chunk.client != client || chunk.round != t_round || chunk.index != t_index {
            let reason = RejectReason::Malformed("chunk does not match its topic".into());
            self.reject_unsigned(session, book, &client, round, &p.payload, reason)
                .await?;
            return Ok(None);
        }
        let key = (client.clone(), t_round);
        let header = if chunk.index == 0 {
            chunk.header.take()
        } else {
            None
        };
        let data = std::mem::take(&mut chunk.data);
        match st
            .reasm
            .insert_for(&client, key.clone(), chunk.index, chunk.total, data)
        {
            Ok(None) => {
                // Held only while its transfer is, so headers never outnumber transfers.
                if let Some(h) = header {
                    st.headers.insert(key, h);
                }
                Ok(None)
            }
            Ok(Some(payload)) => {
                let stored = st.headers.remove(&key);
                Ok(Some((client, t_round, header.or(stored), payload)))
            }
            Err(e) if e.is_capacity() => {
                // Not the sender's doing: no blame, no receipt; it re-sends on its backoff.
                book.refused_busy += 1;
                if book.refused_busy == 1 {
                    tracing::warn!(round, client = %client, error = %e, "reassembly is full; refusing chunks until uploads complete (counted in the report)");
                }
                Ok(None)
            }
            Err(e) => {
                st.headers.remove(&key);
                let reason = RejectReason::Malformed(format!("delta chunk: {e}"));
                self.reject_unsigned(session, book, &client, round, &p.payload, reason)
                    .await?;
                Ok(None)
            }
        }
    }

    /// A client's retained online/offline status: counted for registered clients whose status
    /// names themselves, for the connected-clients figure only (it is unsigned).
    fn on_status(&self, ctx: &RoundContext<'_>, client: &str, payload: &[u8]) {
        if ctx.registry.key(client).is_none() {
            return;
        }
        match envelope::decode::<Status>(payload, Kind::Status, STATUS_LIMIT) {
            Ok(s) if s.client == client => self
                .metrics
                .client_status(client, s.state == StatusState::Online),
            // A cleared retained status (empty payload) or garbage: not online.
            _ => self.metrics.client_status(client, false),
        }
    }

    /// A chunk for a closed round holds nothing. Chunk 0 of the previous round is checked so
    /// an honest retry (typically after a coordinator restart) gets its receipt again if the
    /// journal has it, or learns the round closed; everything else is only counted as late.
    #[allow(clippy::too_many_arguments)]
    async fn on_late(
        &self,
        p: &Publish,
        st: &CollectState,
        book: &mut RoundBook,
        session: &Session,
        ctx: &RoundContext<'_>,
        client: &str,
        t_round: u64,
        t_index: u32,
    ) -> Result<(), CoordinatorError> {
        let text = format!("late: a delta for round {t_round}, which had closed");
        let signed_header = (t_round + 1 == ctx.round && t_index == 0)
            .then(|| envelope::decode::<DeltaChunk>(&p.payload, Kind::DeltaChunk, st.chunk_limit))
            .and_then(Result::ok)
            .filter(|c| c.client == client && c.round == t_round)
            .and_then(|c| c.header)
            .and_then(|h| verify_signer(ctx.registry, client, &h).ok())
            .filter(|h| h.round == t_round);
        let Some(h) = signed_header else {
            if book.late.record(client, true, &text, false) {
                tracing::info!(
                    client,
                    round = t_round,
                    "ignoring chunks for a closed round (further ones are only counted)"
                );
            }
            return Ok(());
        };
        let acked = (client.to_string(), h.payload_digest.to_string());
        if st.previous_acks.contains(&acked) {
            book.resent += 1;
            return self
                .receipt(
                    session,
                    client,
                    t_round,
                    h.payload_digest,
                    ReceiptOutcome::Accepted,
                )
                .await;
        }
        if book.late.record(client, true, &text, true) {
            tracing::info!(
                client,
                round = t_round,
                "a delta arrived after its round closed"
            );
            self.receipt(
                session,
                client,
                t_round,
                h.payload_digest,
                ReceiptOutcome::Rejected(RejectReason::RoundClosed),
            )
            .await?;
        }
        Ok(())
    }

    /// A chunk from a client whose delta is already accepted this round. Chunk 0 carries the
    /// signed header: the same digest is a re-send (its receipt was lost) and gets the receipt
    /// again; another digest is a conflicting upload. Other chunks are parts of such a re-send
    /// and are dropped unread.
    #[allow(clippy::too_many_arguments)]
    async fn on_resend(
        &self,
        p: &Publish,
        st: &CollectState,
        book: &mut RoundBook,
        session: &Session,
        ctx: &RoundContext<'_>,
        client: &str,
        t_index: u32,
    ) -> Result<(), CoordinatorError> {
        if t_index != 0 {
            return Ok(());
        }
        let round = ctx.round;
        // Everything that fails before the signature check is rejected the same way: unsigned,
        // under the payload's digest.
        let checked =
            match envelope::decode::<DeltaChunk>(&p.payload, Kind::DeltaChunk, st.chunk_limit) {
                Ok(c) if c.client == client && c.round == round && c.index == 0 => c
                    .header
                    .ok_or_else(|| RejectReason::Malformed("chunk 0 without a header".into()))
                    .and_then(|header| verify_signer(ctx.registry, client, &header)),
                Ok(_) => Err(RejectReason::Malformed(
                    "chunk does not match its topic".into(),
                )),
                Err(e) => Err(RejectReason::Malformed(format!("delta chunk: {e}"))),
            };
        let h = match checked {
            Ok(h) => h,
            Err(reason) => {
                return self
                    .reject_unsigned(session, book, client, round, &p.payload, reason)
                    .await
            }
        };
        let accepted = book.accepted.get(client).map(|a| a.header.payload_digest);
        if h.round == round && accepted == Some(h.payload_digest) {
            book.resent += 1;
            return self
                .receipt(
                    session,
                    client,
                    round,
                    h.payload_digest,
                    ReceiptOutcome::Accepted,
                )
                .await;
        }
        let reason = if h.round == round {
            RejectReason::ConflictingUpload
        } else {
            RejectReason::WrongRound {
                got: h.round,
                current: round,
            }
        };
        self.reject(
            session,
            book,
            client,
            true,
            round,
            h.payload_digest,
            reason,
            true,
        )
        .await
    }

    /// Rejects a delta chunk that failed before any signature check: unsigned (only the
    /// broker's topic ACLs vouch for the sender), under the digest of the bytes received.
    async fn reject_unsigned(
        &self,
        session: &Session,
        book: &mut RoundBook,
        client: &str,
        round: u64,
        payload: &[u8],
        reason: RejectReason,
    ) -> Result<(), CoordinatorError> {
        self.reject(
            session,
            book,
            client,
            true,
            round,
            digest(payload),
            reason,
            false,
        )
        .await
    }

    /// Counts a rejection against `client` (the topic's, i.e. the authenticated sender with
    /// the broker's ACLs) and tells the client, so it stops retrying. Rate-limited: the first
    /// of each (client, reason, signed) in a round is logged and emitted; later ones are only
    /// counted. A receipt goes out for every signed rejection (its client really sent it) but
    /// only for the first unsigned one, and never to an unregistered id.
    #[allow(clippy::too_many_arguments)]
    async fn reject(
        &self,
        session: &Session,
        book: &mut RoundBook,
        client: &str,
        registered: bool,
        round: u64,
        payload_digest: Digest,
        reason: RejectReason,
        signed: bool,
    ) -> Result<(), CoordinatorError> {
        let text = reason.to_string();
        self.metrics.rejected(reason.code());
        let first = book.tally.record(client, registered, &text, signed);
        if first {
            tracing::warn!(client, round, reason = %text, signed, "delta rejected (more like it this round are only counted)");
            self.emit(RoundEvent::Rejected {
                round,
                client: client.to_string(),
                reason: text,
            });
        }
        if !registered || !(first || signed) {
            return Ok(());
        }
        self.receipt(
            session,
            client,
            round,
            payload_digest,
            ReceiptOutcome::Rejected(reason),
        )
        .await
    }

    async fn receipt(
        &self,
        session: &Session,
        client: &str,
        round: u64,
        payload_digest: Digest,
        outcome: ReceiptOutcome,
    ) -> Result<(), CoordinatorError> {
        if coevo_protocol::topic::validate_id(client).is_err() {
            return Ok(());
        }
        let r = Receipt {
            fleet: self.cfg.fleet.clone(),
            round,
            client: client.to_string(),
            payload_digest,
            outcome,
        };
        let signed = Signed::sign(Kind::Receipt, &r, &self.cfg.client_id, &self.key);
        // Retained (the client's latest receipt): a camera that was reconnecting when its
        // receipt went out — its broker node died, its link dropped — gets it on resubscribing,
        // even after the round closed and nobody would answer a re-send. Cameras match a
        // receipt to their upload by (round, payload digest), so an older one is ignored.
        session
            .publish(
                Topic::Receipt {
                    client: client.to_string(),
                }
                .path(&self.cfg.fleet),
                envelope::encode(Kind::Receipt, &signed),
                true,
            )
            .await?;
        Ok(())
    }
}

/// Acknowledges, in arrival order, every packet at the head of the queue whose upload (if any)
/// is settled.
async fn flush_acks(session: &Session, pipe: &mut Pipeline) -> Result<(), CoordinatorError> {
    while let Some((_, wait)) = pipe.acks.front() {
        if let Some(t) = wait {
            if !pipe.settled.remove(t) {
                break;
            }
        }
        if let Some((p, _)) = pipe.acks.pop_front() {
            session.ack(&p).await?;
        }
    }
    Ok(())
}
