"""Which errors mean "a peer stopped answering" (exit 3, name the silent rank) and which are this rank's own
failure (its traceback, its exit status): the messages gloo gives for a SIGSTOPped or killed peer, as seen in
tests/trainer/run/test_faults.py, and a bug's."""

import pytest

from trainer.run.faults import how_it_failed, is_peer_failure

PEER_GONE = {
    "[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation to complete": "no reply",
    "Application timeout caused pair closure": "no reply",  # the pair closed by the timeout mid-collective
    "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:11155: Connection reset by peer.": "connection closed",
    "[gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:18817.": "connection closed",
}


@pytest.mark.parametrize("message", list(PEER_GONE))
def test_gloos_messages_for_a_lost_peer_are_peer_failures(message):
    assert is_peer_failure(RuntimeError(message))
    assert how_it_failed(RuntimeError(message), 5).startswith(
        "no reply within parallel.collective_timeout_s=5 s" if PEER_GONE[message] == "no reply" else
        "its connection closed")


@pytest.mark.parametrize("error", [RuntimeError("CUDA error: an illegal memory access was encountered"),
                                   ValueError("a bug on rank 1"), RuntimeError("mat1 and mat2 shapes cannot be "
                                                                               "multiplied (timed out? no)")])
def test_a_ranks_own_failure_is_not_a_peer_failure(error):
    assert not is_peer_failure(error)
