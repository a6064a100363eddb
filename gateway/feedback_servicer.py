"""`infermesh.feedback.v1.Feedback` at the gateway: protobuf ↔ gateway.feedback, nothing more (domain errors become
status codes in infermesh.method_handlers)."""

from __future__ import annotations

from typing import Any

import grpc

from gateway.feedback import Feedback, LabelReport
from infermesh.errors import FailedPrecondition, InvalidInput
from infermesh.method_handlers import call_of
from infermesh.proto import feedback_pb2, feedback_pb2_grpc

SERVICE = feedback_pb2.DESCRIPTOR.services_by_name["Feedback"].full_name


class FeedbackServicer(feedback_pb2_grpc.FeedbackServicer):
    def __init__(self, feedback: Feedback | None, default_timeout_s: float) -> None:
        self.feedback = feedback  # None: this gateway has no prediction log to join labels to
        self.default_timeout_s = default_timeout_s

    async def ReportLabels(
        self, request: feedback_pb2.ReportLabelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> feedback_pb2.ReportLabelsResponse:
        call = call_of(context, self.default_timeout_s)
        if self.feedback is None:
            raise FailedPrecondition("label feedback is not configured on this gateway (no prediction log)")
        if len(request.labels) > self.feedback.max_labels:  # before a report per label is built
            raise InvalidInput(
                f"a feedback call carries 1 to {self.feedback.max_labels} labels, got {len(request.labels)}"
            )
        labels = [LabelReport(label.request_id, label.label, label.event_time_ms) for label in request.labels]
        joined, outcomes = await self.feedback.report_labels(call, labels)
        response = feedback_pb2.ReportLabelsResponse(joined=joined)
        for outcome in outcomes:
            response.results.add(
                code=outcome.code, message=outcome.message, model=outcome.model, version=outcome.version
            )
        return response


def add_to_server(servicer: FeedbackServicer, server: Any) -> None:
    feedback_pb2_grpc.add_FeedbackServicer_to_server(servicer, server)
