"""An in-memory Grid: the real ClientApp pieces in the server's process, every message serialized
and parsed back as a deployment would (nothing is shared between server and client objects).

Nodes 101.. hold partition ids 0..num_clients-1; partition-id queries are answered as a SuperNode's
ClientApp answers them, TRAIN messages go through the ClientApp's privacy mod chain to
`handle_train` (replace `_train` to stand in for training). Used by the SecAgg+ tests and
experiments/secagg_bytes.py.
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto

from fedsparse.apps.client_train import handle_train
from fedsparse.federation.sampling import partition_reply
from fedsparse.privacy import dp


def wire_copy(message: Message) -> Message:
    """What crosses the wire: the message serialized and parsed back."""
    return message_from_proto(message_to_proto(message))


class InProcessGrid:
    """The Grid a strategy drives (`get_node_ids`, `send_and_receive`), over `cfg.federation.num_clients` nodes."""

    run = type("Run", (), {"run_id": 1})()  # what the legacy client manager reads

    def __init__(self, cfg):
        self.cfg = cfg
        clients = cfg.federation.num_clients
        self.contexts = {
            101 + i: Context(
                run_id=1,
                node_id=101 + i,
                node_config={"partition-id": i, "num-partitions": clients},
                state=RecordDict(),
                run_config={},
            )
            for i in range(clients)
        }
        self.trained: list[Message] = []  # each client's reply as its handler returned it
        self.received: list[Message] = []  # every reply the server got

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def _train(self, msg: Message, ctxt: Context) -> Message:
        reply = handle_train(msg, ctxt, self.cfg)
        self.trained.append(wire_copy(reply))
        return reply

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            msg = wire_copy(message)
            ctxt = self.contexts[msg.metadata.dst_node_id]
            if msg.metadata.message_type == MessageType.QUERY:
                reply = partition_reply(msg, ctxt.node_config)
            else:
                reply = dp.client_mod(lambda _: self.cfg)(msg, ctxt, self._train)
            replies.append(wire_copy(reply))
        self.received += replies
        return replies
