"""Prometheus metrics of one gateway, in its own registry.

Label sets are bounded by construction: outcome codes, ptt and DLR codes from fixed tables,
channel and result names; never a phone number, a message id or a caller-chosen string. The
account label is only ever an authenticated account's name, and can be switched off.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter as Tally
from collections.abc import Sequence

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from gateway.records import FinalState

# generate_latest writes the classic text format (0.0.4), whatever CONTENT_TYPE_LATEST says.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_LIFETIME = (0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 6 * 3600, 24 * 3600, 48 * 3600)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    def __init__(self, *, per_account_labels: bool = True) -> None:
        self.per_account = per_account_labels
        r = self.registry = CollectorRegistry(auto_describe=True)
        account = ["account"] if per_account_labels else []
        self.send_requests = Counter(
            "http2sms_send_requests", "Send URL requests by outcome code (100, 201, 429...).",
            ["outcome", *account], registry=r)
        self.messages_accepted = Counter(
            "http2sms_messages_accepted", "SMS accepted (one per recipient).", account,
            registry=r)
        self.credits_spent = Counter(
            "http2sms_credits_spent", "Credits taken by accepted sends.", account, registry=r)
        self.auth_failures = Counter(
            "http2sms_auth_failures",
            "Refused logins by reason (password, ip, locked, slowed: a login over its "
            "budget of failures; busy: no place in the password-check queue, or checks "
            "under way hold a key's last places before a lock; abandoned: the client hung "
            "up before its check ran).", ["reason"], registry=r)
        self.lockouts = Counter(
            "http2sms_lockouts", "Keys locked after repeated failed logins.", registry=r)
        self.shared_addresses = Counter(
            "http2sms_shared_addresses",
            "Addresses seen logging in many distinct users (security.shared_address_users): "
            "a NAT or an undeclared proxy whose lockouts would hit them all.", registry=r)
        self.inflight = Gauge(
            "http2sms_inflight_requests", "HTTP requests being served.", registry=r)
        self.overloaded = Counter(
            "http2sms_overload_rejections", "Requests answered 503 by the in-flight limit.",
            registry=r)
        self.reading = Gauge(
            "http2sms_requests_reading", "HTTP requests whose body is still arriving (not "
            "yet in flight).", registry=r)
        self.connections = Gauge(
            "http2sms_connections", "Open client connections on the listeners.", registry=r)
        self.address_rejections = Counter(
            "http2sms_address_limit_rejections", "Connections (answered 429 and closed) and "
            "requests (answered 429) over their client address's cap, by limit.", ["limit"],
            registry=r)
        self.connection_timeouts = Counter(
            "http2sms_connection_timeouts", "Connections closed for a missed deadline, by "
            "what they were waiting for (head, body, idle).", ["phase"], registry=r)
        self.readiness_checks = Counter(
            "http2sms_readiness_checks", "Readiness checks run (probes within about a "
            "second share one).", registry=r)
        self.commit_seconds = Histogram(
            "http2sms_store_commit_seconds", "Time to commit one group of sends.",
            buckets=_LATENCY, registry=r)
        self.commit_batch = Histogram(
            "http2sms_store_commit_batch_size", "Send requests per group commit.",
            buckets=_BATCH, registry=r)
        self.operator_submit_seconds = Histogram(
            "http2sms_operator_submit_seconds", "Time to hand a batch to the operator.",
            buckets=_LATENCY, registry=r)
        self.messages_final = Counter(
            "http2sms_messages_final", "Messages reaching a final state, by ptt and DLR.",
            ["ptt", "dlr"], registry=r)
        self.time_to_final = Histogram(
            "http2sms_time_to_final_seconds", "From acceptance (for a deferred message: "
            "from its deferred time) to its final state.",
            buckets=_LIFETIME, registry=r)
        self.callback_attempts = Counter(
            "http2sms_callback_attempts", "Delivery-report callback attempts by result "
            "(ok, retry, dead).", ["result"], registry=r)
        self.alerts_sent = Counter(
            "http2sms_alerts", "Low-credit alerts by channel (mail, sms) and result.",
            ["channel", "result"], registry=r)
        self.backlog = Gauge(
            "http2sms_backlog", "Work waiting: queued, deferred and sent (not final) "
            "messages, pending and dead outbox items in the store; handover and reports "
            "waiting in memory for the operator and for the store.", ["queue"], registry=r)
        # The SMPP connector's (gateway/operators/smpp/); zero with another operator.
        self.smpp_binds_up = Gauge(
            "http2sms_smpp_binds_up", "SMPP binds up (a transceiver or a transmitter and "
            "receiver pair counts one).", registry=r)
        self.smpp_window_in_use = Gauge(
            "http2sms_smpp_window_in_use", "submit_sm sent and not yet answered.", registry=r)
        self.smpp_submit_seconds = Histogram(
            "http2sms_smpp_submit_seconds", "From sending a submit_sm to its answer.",
            buckets=_LATENCY, registry=r)
        self.smpp_throttled = Counter(
            "http2sms_smpp_throttled", "submit_sm answered throttled or queue full.",
            registry=r)
        self.smpp_receipts = Counter(
            "http2sms_smpp_receipts", "Delivery receipts by stat (DELIVRD, UNDELIV...; "
            "OTHER for a stat outside SMPP 3.4's).", ["stat"], registry=r)
        # The retention purge's (gateway/purge.py), in the process that runs it.
        self.purged = Counter(
            "http2sms_purged_rows", "Rows the retention purge erased (personal data) or "
            "deleted, by action and table.", ["action", "table"], registry=r)
        self._sent_children: dict[tuple[int, str], tuple[Counter, Counter, Counter]] = {}

    def account(self, name: str) -> tuple[str, ...]:
        return (name,) if self.per_account else ()

    def sent(self, outcome: int, account: str | None, messages: int, credits: float) -> None:
        """One answered send request; `account` only once the caller is authenticated."""
        key = (outcome, account or "")
        children = self._sent_children.get(key)
        if children is None:
            children = self._sent_children[key] = self._children_of(*key)
        requests, accepted, spent = children
        requests.inc()
        if messages:
            accepted.inc(messages)
            spent.inc(credits)

    def _children_of(self, outcome: int, account: str) -> tuple[Counter, Counter, Counter]:
        # Kept per (outcome, account), both bounded like the labels themselves: looking up
        # three labelled children on every send was 3.6% of the send process's CPU.
        labels = self.account(account)
        accepted, spent = self.messages_accepted, self.credits_spent
        if labels:
            # Without the account label these counters have no labels at all, and
            # prometheus_client refuses an empty .labels() call.
            accepted, spent = accepted.labels(*labels), spent.labels(*labels)
        return self.send_requests.labels(str(outcome), *labels), accepted, spent

    def finals(self, finals: Sequence[FinalState]) -> None:
        """Count a batch of messages that reached their final state."""
        if not finals:
            return
        # One labelled increment per distinct state, not one per message: a batch holds
        # up to a thousand messages and only a handful of states.
        for (code, dlr), count in Tally((f.ptt, f.dlr) for f in finals).items():
            self.messages_final.labels(str(code), str(dlr)).inc(count)
        observe_many(self.time_to_final, [max(0.0, f.at - f.due_at) for f in finals])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def observe_many(histogram: Histogram, amounts: Sequence[float]) -> None:
    """`histogram.observe` of each amount, with one increment per bucket and one of the
    sum for them all. prometheus_client has no call for a batch, and its `observe` took
    2-4 µs an amount: the delivery worker's thousands of final states a second. Its own
    steps (`Histogram.observe`): the first bucket whose bound is >= the amount."""
    if not amounts:
        return
    bounds = histogram._upper_bounds
    counts = [0] * len(bounds)
    for amount in amounts:
        counts[bisect_left(bounds, amount)] += 1
    for bucket, count in zip(histogram._buckets, counts, strict=True):
        if count:
            bucket.inc(count)
    histogram._sum.inc(sum(amounts))


def merge_expositions(*texts: bytes) -> bytes:
    """One exposition from those of several processes of one gateway (same metric names).

    Samples with the same name and labels are added up: counters and histograms count
    events of both processes, and each gauge is set in one process only. A `_created`
    time keeps the earliest.
    """
    families: dict[str, tuple[str, str, dict[tuple[str, tuple[tuple[str, str], ...]],
                                                float]]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode()):
            _, _, samples = families.setdefault(
                family.name, (family.documentation, family.type, {}))
            earliest = family.name.endswith("_created")
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif earliest:
                    samples[key] = min(samples[key], sample.value)
                else:
                    samples[key] += sample.value
    lines: list[str] = []
    for name, (doc, kind, samples) in families.items():
        if kind == "counter":
            name += "_total"  # the parser drops it; the text format's lines carry it
        lines.append(f"# HELP {name} {_escape_help(doc)}")
        lines.append(f"# TYPE {name} {kind}")
        for (sample_name, labels), value in samples.items():
            shown = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(f"{sample_name}{{{shown}}} {floatToGoString(value)}" if shown
                         else f"{sample_name} {floatToGoString(value)}")
    return ("\n".join(lines) + "\n").encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r'\"')
