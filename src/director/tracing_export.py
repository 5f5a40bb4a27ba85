"""The OpenTelemetry SDK's side of tracing: the provider, its sampler and resource, a bounded
batch queue and the OTLP/HTTP (protobuf) exporter, built from the ``OTEL_*`` settings.

Imported only when tracing is on (the SDK and exporter cost ~45 ms and ~5 MB to import).

Export never touches the reactor: spans ended on it are appended to the batch processor's
bounded queue (``OTEL_BSP_MAX_QUEUE_SIZE``, 2048 by default; a few hundred nanoseconds), and
the processor's own thread encodes and posts them. A full queue drops the new span, counted
in ``director_tracing_spans_dropped_total{reason="queue_full"}``; a batch the collector did
not take (unreachable, refusing, too slow) is lost, counted under ``reason="export_failed"``.
An unreachable collector is logged once, when the first export fails, and once more when one
succeeds again — not once per batch, as the exporter itself would (its own loggers are
quietened).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Tracer
from twisted.logger import Logger

from director import __version__
from director.config import Settings

if TYPE_CHECKING:
    from director.metrics import Metrics

log = Logger(namespace="tracing")

#: Loggers of the SDK that would write a line per failed batch or per dropped span.
QUIET_LOGGERS = ("opentelemetry.exporter.otlp.proto.http", "opentelemetry.sdk._shared_internal",
                 "opentelemetry.exporter.otlp.proto.common", "opentelemetry.sdk.trace.export")


def sampler_of(name: str, argument: float | None) -> Sampler:
    """The sampler ``OTEL_TRACES_SAMPLER`` names (``config_variables.SAMPLERS``)."""
    ratio = 1.0 if argument is None else argument
    fixed = {"always_on": ALWAYS_ON, "always_off": ALWAYS_OFF}
    root: Sampler = fixed.get(name.removeprefix("parentbased_")) or TraceIdRatioBased(ratio)
    return ParentBased(root) if name.startswith("parentbased_") else root


class ReportingExporter(SpanExporter):
    """The OTLP exporter, with a line when the collector stops taking spans and one when it
    takes them again, and the spans of failed batches counted."""

    def __init__(self, exporter: SpanExporter, endpoint: str, metrics: Metrics | None,
                 reactor: Any) -> None:
        self.exporter = exporter
        self.endpoint = endpoint
        self.metrics = metrics
        self.reactor = reactor
        self.failing = False
        #: Spans lost by failed exports and by a full queue (also without metrics: doctor).
        self.dropped = {"export_failed": 0, "queue_full": 0}

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        # On the processor's thread: everything said to the reactor goes through callFromThread.
        try:
            result = self.exporter.export(spans)
        except Exception:
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            if self.failing:
                self.failing = False
                self.reactor.callFromThread(
                    log.info, "tracing: the collector at {endpoint} takes spans again",
                    endpoint=self.endpoint)
            return result
        self.dropped_spans("export_failed", len(spans))
        if not self.failing:
            self.failing = True
            self.reactor.callFromThread(
                log.warn, "tracing: the collector at {endpoint} did not take {count} span(s) "
                "(unreachable, refusing or too slow); spans are dropped until it does, and "
                "counted in director_tracing_spans_dropped_total (logged once until it "
                "recovers)", endpoint=self.endpoint, count=len(spans))
        return result

    def dropped_spans(self, reason: str, count: int) -> None:
        self.dropped[reason] += count
        if self.metrics is not None:
            self.metrics.tracing_dropped.labels(reason).inc(count)

    def shutdown(self) -> None:
        self.exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.exporter.force_flush(timeout_millis)


class BoundedBatchProcessor(BatchSpanProcessor):
    """The SDK's batch processor, whose queue drops new spans when full, counting them
    (the SDK's would drop the oldest one and log a warning per span)."""

    def __init__(self, exporter: ReportingExporter) -> None:
        super().__init__(exporter)
        self.reporting = exporter
        inner = self._batch_processor
        self._queue: Any = getattr(inner, "_queue", None)
        self._max = getattr(inner, "_max_queue_size", 0)

    def on_end(self, span: ReadableSpan) -> None:
        if not span.context.trace_flags.sampled:
            return
        if self._queue is not None and len(self._queue) >= self._max:
            self.reporting.dropped_spans("queue_full", 1)
            return
        super().on_end(span)


class TracingExport:
    """What the service keeps of tracing: the provider, to be shut down with the service."""

    def __init__(self, settings: Settings, metrics: Metrics | None, reactor: Any) -> None:
        endpoint = settings.tracing_endpoint
        assert endpoint is not None
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL + 1)
        self.endpoint = endpoint
        headers = dict(settings.otel_headers) | dict(settings.otel_traces_headers)
        self.exporter = ReportingExporter(OTLPSpanExporter(endpoint=endpoint, headers=headers),
                                          endpoint, metrics, reactor)
        self.processor = BoundedBatchProcessor(self.exporter)
        resource = Resource.create({"service.name": settings.otel_service_name,
                                    "service.version": __version__})
        self.provider = TracerProvider(
            sampler=sampler_of(settings.otel_traces_sampler, settings.otel_traces_sampler_arg),
            resource=resource)
        self.provider.add_span_processor(self.processor)
        self.tracer: Tracer = self.provider.get_tracer("director", __version__)

    def shutdown(self) -> None:
        """Export what is queued, then stop the processor's thread. Blocks (as long as the
        exporter's timeout when the collector does not answer): run it in a thread."""
        self.provider.shutdown()
