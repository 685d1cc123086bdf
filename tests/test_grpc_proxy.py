"""The proxy's load-shedding gate (it learns the ingress's bound from its refusals and forgets it), and
the codes of lost replicas."""

from __future__ import annotations

from cluster.grpc_proxy import ShedGate


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_gate_refuses_beyond_the_in_flight_count_at_which_the_ingress_refused() -> None:
    clock = Clock()
    gate = ShedGate(hold_s=1.0, clock=clock)
    assert all(gate.try_enter() for _ in range(5)) and gate.in_flight == 5
    gate.leave(refused_downstream=True)  # the ingress refused with 5 in flight: the limit is 5
    assert (gate.limit, gate.in_flight) == (5, 4)
    assert gate.try_enter()  # 4 in flight: below the limit
    assert not gate.try_enter() and gate.num_shed == 1  # 5 in flight: refused here, not counted in
    assert gate.in_flight == 5
    gate.leave(refused_downstream=False)
    assert gate.try_enter()  # a call ended: one more goes through


def test_gate_forgets_its_limit_after_the_hold_so_added_capacity_is_found() -> None:
    clock = Clock()
    gate = ShedGate(hold_s=1.0, clock=clock)
    for _ in range(3):
        gate.try_enter()
    gate.leave(refused_downstream=True)
    gate.try_enter()
    assert not gate.try_enter()
    clock.now = 1.5  # no refusal from the ingress for longer than the hold
    assert gate.try_enter() and gate.limit is None and gate.in_flight == 4


def test_a_gate_with_no_refusals_admits_everything() -> None:
    gate = ShedGate()
    assert all(gate.try_enter() for _ in range(10_000)) and gate.num_shed == 0


def test_a_lost_ingress_replica_is_unavailable_at_the_proxy_and_a_lost_engine_at_the_ingress() -> None:
    import grpc
    from ray.exceptions import ActorDiedError, ActorUnavailableError, NodeDiedError, OwnerDiedError
    from ray.serve._private import proxy

    from cluster.errors import ErrorKind, classify
    from cluster.grpc_proxy import report_lost_ingress_as_unavailable

    report_lost_ingress_as_unavailable()
    report_lost_ingress_as_unavailable()  # once only: the proxy calls install once per servicer function
    status = proxy.get_grpc_response_status(ActorUnavailableError("Socket closed", None), None, "r1")
    assert status.code is grpc.StatusCode.UNAVAILABLE and status.message.startswith("proxy: the ingress")
    assert proxy.get_grpc_response_status(RuntimeError("a bug"), None, "r2").code is grpc.StatusCode.INTERNAL
    for lost in (ActorDiedError(), ActorUnavailableError("Socket closed", None), NodeDiedError("gone")):
        assert classify(lost)[0] is ErrorKind.UNAVAILABLE
    assert classify(OwnerDiedError("ab" * 14, "", ""))[0] is ErrorKind.UNAVAILABLE
