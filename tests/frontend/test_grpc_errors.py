"""Typed errors map one to one onto gRPC status codes."""

from __future__ import annotations

import grpc
import pytest

from services.frontend.grpc_errors import status_code
from shared import errors

ALL = [errors.Cancelled, errors.InvalidArgument, errors.DeadlineExceeded, errors.NotFound,
       errors.AlreadyExists, errors.PermissionDenied, errors.ResourceExhausted,
       errors.FailedPrecondition, errors.Aborted, errors.OutOfRange, errors.Unimplemented,
       errors.Internal, errors.Unavailable, errors.DataLoss, errors.Unauthenticated]


@pytest.mark.parametrize("cls", ALL)
def test_each_error_has_its_own_code(cls: type[errors.CriopyError]) -> None:
    code = status_code(cls("x"))
    assert code.name == cls.code
    assert code not in (grpc.StatusCode.OK, grpc.StatusCode.UNKNOWN)


def test_codes_are_distinct() -> None:
    assert len({status_code(cls("x")) for cls in ALL}) == len(ALL)


@pytest.mark.parametrize("cls", ALL)
def test_wire_round_trip_keeps_class_message_and_retriable(cls: type[errors.CriopyError]) -> None:
    original = cls("it broke", retriable=True)
    again = errors.from_wire(original.to_wire())
    assert type(again) is cls and again.message == "it broke" and again.retriable


def test_unknown_wire_error_is_unknown_not_a_crash() -> None:
    assert status_code(errors.from_wire({"code": "WHAT", "message": "m"})) == grpc.StatusCode.UNKNOWN
    assert isinstance(errors.from_wire("garbage"), errors.Internal)
