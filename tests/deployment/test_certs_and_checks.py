"""Certificates, connection checks and update screening (fast; no Flower processes)."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from typer.testing import CliRunner

from client.join import check_reachable, check_tls, explain_supernode_exit
from rectalfl import app
from server.deploy import write_connection
from shared.certs import CertError, add_site, init_ca, site_public_keys
from shared.flower import DeployError


def test_ca_server_and_site_keys(tmp_path):
    files = init_ca(tmp_path, ["fl.hospital.example", "10.0.0.5"])
    ca = x509.load_pem_x509_certificate(files["ca_cert"].read_bytes())
    srv = x509.load_pem_x509_certificate(files["server_cert"].read_bytes())
    assert srv.issuer == ca.subject
    ca.public_key().verify(srv.signature, srv.tbs_certificate_bytes,
                           __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ECDSA"]).ECDSA(
                               srv.signature_hash_algorithm))
    san = srv.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.hospital.example" in san.get_values_for_type(x509.DNSName)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert (files["ca_key"].stat().st_mode & 0o077) == 0  # private keys readable by the owner only
    site = add_site(tmp_path, "site_a")
    key = load_ssh_private_key(site["key"].read_bytes(), None)  # what flower-supernode loads
    pub = load_ssh_public_key(site["pub"].read_bytes())
    assert key.public_key().public_numbers() == pub.public_numbers()
    assert site["pub"].read_text().startswith("ecdsa-sha2-nistp384 ")
    assert site_public_keys(tmp_path) == {"site_a": site["pub"]}


def test_cert_errors_say_what_to_do(tmp_path):
    with pytest.raises(CertError, match="certs init"):
        add_site(tmp_path, "site_a")
    init_ca(tmp_path)
    with pytest.raises(CertError, match="--force"):
        init_ca(tmp_path)
    with pytest.raises(CertError, match="site name"):
        add_site(tmp_path, "../evil")
    add_site(tmp_path, "site_a")
    with pytest.raises(CertError, match="rotate-site site_a"):
        add_site(tmp_path, "site_a")


def test_cli_certs(tmp_path):
    r = CliRunner()
    res = r.invoke(app, ["certs", "init", "--dir", str(tmp_path / "c"), "--host", "fl.example"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["certs", "add-site", "site_b", "--dir", str(tmp_path / "c")])
    assert res.exit_code == 0 and (tmp_path / "c" / "sites" / "site_b" / "site.key").is_file()
    res = r.invoke(app, ["certs", "add-site", "x", "--dir", str(tmp_path / "none")])
    assert res.exit_code == 2 and "certs init" in " ".join(res.output.split())  # the console wraps long paths


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_is_a_clear_error():
    with pytest.raises(DeployError, match="cannot reach the SuperLink at 127.0.0.1:.*server start"):
        check_reachable(f"127.0.0.1:{_closed_port()}", timeout=2)


def test_certificate_from_another_ca_is_refused(tmp_path):
    """A TLS server whose certificate the site's ca.crt did not sign: the message says so."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    init_ca(ours)
    init_ca(theirs)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(theirs / "server.crt", theirs / "server.key")
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]

    def serve():
        for _ in range(2):
            try:
                conn, _ = srv.accept()
                with ctx.wrap_socket(conn, server_side=True):
                    pass
            except (OSError, ssl.SSLError):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(DeployError, match="does not vouch"):
            check_tls(f"127.0.0.1:{port}", ours / "ca.crt")
    finally:
        srv.close()
    with pytest.raises(DeployError, match="ca.crt"):
        check_tls(f"127.0.0.1:{port}", tmp_path / "missing.crt")


def test_supernode_exit_explanations():
    msg = explain_supernode_exit(1, "ERROR: Exit Code: 305\nFailed to activate SuperNode", Path("k"), "site_q")
    assert "not registered" in msg and "`rectalfl certs add-site site_q`" in msg and "rotate-site site_q" in msg
    assert "OpenSSH" in explain_supernode_exit(1, "Exit Code: 302 Unable to parse the private key file", Path("k"))
    assert "exit code 7" in explain_supernode_exit(7, "boom", Path("k"))


def test_connection_file(tmp_path):
    path = write_connection(tmp_path, "rectalfl", "127.0.0.1:9093", tmp_path / "ca.crt")
    text = path.read_text()
    assert 'default = "rectalfl"' in text and 'address = "127.0.0.1:9093"' in text and "root-certificates" in text


# ------------------------------------------------------------------ update screening
def test_non_finite_and_outlier_updates_are_rejected(tmp_path, run_identity):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from server.orchestrator import Orchestrator
    from server.store import RunStore
    from shared.config import parse_config
    from shared.records import arrays_to_record

    cfg = parse_config({"federation": {"max_update_norm_ratio": 10}}, source="test")
    store = RunStore.open_run_dir(tmp_path)
    store.start_run("r", "t", cfg.to_yaml(), cfg.digest(), "federated", "fedavg", 0, "deployment")
    orch = Orchestrator(None, cfg, tmp_path, store, "r")
    current = {"m/w": np.zeros(100, dtype=np.float32), "m/count": np.zeros((), dtype=np.int64)}
    rng = np.random.default_rng(0)

    def reply(site: str, w: np.ndarray) -> Message:
        content = RecordDict({"arrays": arrays_to_record({"m/w": w.astype(np.float32), "m/count": current["m/count"]}),
                              "metrics": MetricRecord({"num-examples": 10}), "site": ConfigRecord({"name": site})})
        return Message(content, dst_node_id=1, message_type="train")

    good = [reply(s, rng.normal(0, 0.01, 100)) for s in ("a", "b", "c")]
    nan = rng.normal(0, 0.01, 100)
    nan[3] = np.nan
    replies = [*good, reply("nan_site", nan), reply("huge_site", rng.normal(0, 5.0, 100))]
    kept = orch.screen_updates(4, replies, arrays_to_record(current))
    assert [str(m.content["site"]["name"]) for m in kept] == ["a", "b", "c"]
    ev = store.events("r")
    rej = ev[ev["kind"] == "update_rejected"].set_index("site")
    assert set(rej.index) == {"nan_site", "huge_site"}
    assert "non-finite" in rej.loc["nan_site", "message"] and "median" in rej.loc["huge_site", "message"]
    assert (rej["round"] == 4).all()
    store.close()


# ------------------------------------------------------------------ rejoin under a new node id
class _FakeGrid:
    """Answers ``query.describe`` for whichever nodes are connected (node id -> claimed site name); the
    SuperLink's node info registers each node under ``registered`` (default: its claimed name)."""

    def __init__(self, nodes: dict[int, str], registered: dict[int, str] | None = None):
        self.nodes = dict(nodes)
        self.registered = dict(registered or {})
        self.asked: list[list[int]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo

        return [NodeInfo(node_id=n, name=self.registered.get(n, s)) for n, s in self.nodes.items()]

    def send_and_receive(self, messages, timeout=None):
        from flwr.app import ConfigRecord, Message, RecordDict

        from shared.records import pack_json

        self.asked.append([m.metadata.dst_node_id for m in messages])
        return [Message(RecordDict({"info": ConfigRecord({"info": pack_json({"site": self.nodes[m.metadata.dst_node_id],
                                                                              "train": 5, "test": 2})})}),
                        reply_to=m) for m in messages]


def test_a_site_that_reconnects_under_a_new_node_id_is_mapped_back(tmp_path, run_identity):
    from server.orchestrator import Orchestrator
    from server.store import RunStore
    from shared.config import parse_config

    cfg = parse_config({"federation": {"min_sites": 2, "external_sites": ["ext"]}}, source="test")
    store = RunStore.open_run_dir(tmp_path)
    store.start_run("r", "t", cfg.to_yaml(), cfg.digest(), "federated", "fedavg", 0, "deployment")
    grid = _FakeGrid({11: "site_a", 12: "site_b", 13: "ext"})
    orch = Orchestrator(grid, cfg, tmp_path, store, "r", external_sites={"ext"}, expected_nodes=3)
    orch.discover()
    assert {n.site: n.node_id for n in orch.nodes} == {"site_a": 11, "site_b": 12, "ext": 13}
    assert orch.refresh_nodes(2) is False and len(grid.asked) == 1  # nothing new: nobody is asked again

    # site_b's SuperNode restarted (new node id); a new hospital site_c connected
    grid.nodes = {11: "site_a", 99: "site_b", 13: "ext", 50: "site_c"}
    assert orch.refresh_nodes(3) is True
    assert sorted(grid.asked[-1]) == [50, 99]  # only the unknown ids are asked who they are
    assert {n.site: n.node_id for n in orch.train_nodes} == {"site_a": 11, "site_b": 99, "site_c": 50}
    assert [n.site for n in orch.nodes if n.role == "external"] == ["ext"]
    ev = store.events("r")
    rejoined = ev[ev["kind"] == "site_rejoined"]
    assert rejoined["site"].tolist() == ["site_b"] and rejoined["round"].tolist() == [3]
    assert "node 99" in rejoined["message"].iloc[0]
    store.close()


# ------------------------------------------------------------------ packed weights on the wire
def test_packed_weights_round_trip_and_aggregate_like_unpacked(run_identity):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from shared.records import arrays_to_record, pack_arrays, record_to_arrays, unpack_arrays

    rng = np.random.default_rng(1)
    shapes = {"pre_t2w/w": (4, 3), "pre_t2w/b": (3,), "pre_t2w/idx": (2,), "post_dwi/w": (5,)}
    sites = []
    for _ in range(3):
        arrs = {k: (rng.integers(0, 9, s) if k.endswith("idx") else rng.normal(size=s).astype(np.float32))
                for k, s in shapes.items()}
        sites.append(arrs)
    rec, layout = pack_arrays(sites[0])
    assert len(rec) == 2  # one flat array per dtype (float32, int64), whatever the number of tensors
    back = unpack_arrays(rec, layout)
    assert list(back) == list(shapes) and all(np.array_equal(back[k], sites[0][k]) for k in shapes)
    # a reply packed in the server's layout, whatever its own key order
    rec_b, same = pack_arrays(dict(reversed(list(sites[1].items()))), layout)
    assert same == layout and np.array_equal(unpack_arrays(rec_b, layout)["pre_t2w/w"], sites[1]["pre_t2w/w"])
    with pytest.raises(ValueError, match="layout"):
        pack_arrays({k: v for k, v in sites[1].items() if k != "pre_t2w/b"}, layout)
    with pytest.raises(ValueError, match="shape"):
        pack_arrays({**sites[1], "post_dwi/w": np.zeros(6, np.float32)}, layout)

    def replies(packed: bool) -> list[Message]:
        out = []
        for i, arrs in enumerate(sites):
            r = pack_arrays(arrs, layout)[0] if packed else arrays_to_record(arrs)
            out.append(Message(RecordDict({"arrays": r, "metrics": MetricRecord({"num-examples": 3 + 4 * i}),
                                           "site": ConfigRecord({"name": f"s{i}"})}), dst_node_id=1,
                               message_type="train"))
        return out

    agg_plain, _ = FedAvg(weighted_by_key="num-examples").aggregate_train(1, replies(False))
    agg_packed, _ = FedAvg(weighted_by_key="num-examples").aggregate_train(1, replies(True))
    plain, packed = record_to_arrays(agg_plain), unpack_arrays(agg_packed, layout)
    for k in shapes:  # element-wise averaging: bit-identical
        assert np.array_equal(plain[k], packed[k]), k
