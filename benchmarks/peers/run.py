"""`make bench-peers`: the gateway against MLServer (V2 protocol, tuned), in the same run.

MLServer runs from its own virtualenv (benchmarks/.venv-peers, made by `make bench-peers`) with
benchmarks/peers/model.py: the same decode, off the event loop, no parallel workers. Over REST
the image goes base64 in V2 JSON; over gRPC as raw bytes in a ModelInferRequest. The gateway runs
with its defaults. Same images, load generators and concurrency for both.
"""

from __future__ import annotations

import argparse
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench import (  # noqa: E402
    SERVICE,
    check_grpc,
    free_port,
    grpc_frame,
    run_h2load,
    run_wrk,
    wait_for_port,
)
from benchmarks.images import bench_images  # noqa: E402
from benchmarks.serving import gateway, process  # noqa: E402
from clients.pb.imagegateway.v1 import gateway_pb2 as pb  # noqa: E402

PEERS = ROOT / "benchmarks" / ".venv-peers" / "bin"
HERE = Path(__file__).resolve().parent


def v2_json(image: bytes) -> bytes:
    return json.dumps(
        {
            "inputs": [
                {
                    "name": "image",
                    "shape": [1],
                    "datatype": "BYTES",
                    "data": [base64.b64encode(image).decode()],
                    "parameters": {"content_type": "base64"},
                }
            ]
        }
    ).encode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--concurrency", default="8,64")
    args = parser.parse_args()
    if not (PEERS / "mlserver").exists():
        parser.error("no MLServer: run `make bench-peers`, which makes benchmarks/.venv-peers")
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    images = [i for i in bench_images() if i.name in ("64x64 PNG", "640x480 JPEG")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "decode").mkdir()
        shutil.copy(HERE / "model.py", root / "decode" / "model.py")
        (root / "decode" / "model-settings.json").write_text(
            json.dumps({"name": "decode", "implementation": "model.DecodeModel"})
        )
        http_port, grpc_port, metrics_port = free_port(), free_port(), free_port()
        (root / "settings.json").write_text(
            json.dumps(
                {
                    "host": "127.0.0.1",
                    "http_port": http_port,
                    "grpc_port": grpc_port,
                    "metrics_port": metrics_port,
                    "parallel_workers": 0,
                }
            )
        )
        with (
            process(
                [str(PEERS / "mlserver"), "start", str(root)],
                cwd=root,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            gateway([]) as (gw_http, gw_grpc, _),
        ):
            wait_for_port(http_port, 60)
            wait_for_port(grpc_port, 60)
            print(
                "| image | conc. | gateway HTTP | MLServer REST | ratio | gateway gRPC | "
                "MLServer gRPC | ratio |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for image in images:
                payload = root / "payload.bin"
                source = root / "image.bin"
                source.write_bytes(image.data)
                subprocess.run(
                    [
                        str(PEERS / "python"),
                        str(HERE / "grpc_payload.py"),
                        str(source),
                        str(payload),
                    ],
                    check=True,
                )
                mls_grpc = payload.read_bytes()
                mls_json = v2_json(image.data)
                # Answers checked before timing, for both servers.
                request = urllib.request.Request(
                    f"http://127.0.0.1:{http_port}/v2/models/decode/infer",
                    data=mls_json,
                    headers={"Content-Type": "application/json"},
                )
                with urllib.request.urlopen(request, timeout=30) as response:
                    reply = json.loads(response.read())
                assert reply["outputs"][0]["data"] == image.shape, reply
                check_grpc(
                    f"127.0.0.1:{grpc_port}",
                    "/inference.GRPCInferenceService/ModelInfer",
                    mls_grpc[5:],
                    False,
                )
                single = grpc_frame(
                    pb.InferRequest(image=pb.Image(data=image.data)).SerializeToString()
                )
                for conc in concurrencies:
                    d = args.duration
                    g_http = run_wrk(
                        f"{gw_http}/v1/infer", image.data, "application/octet-stream", conc, d, 1
                    )
                    m_rest = run_wrk(
                        f"http://127.0.0.1:{http_port}/v2/models/decode/infer",
                        mls_json,
                        "application/json",
                        conc,
                        d,
                        1,
                    )
                    g_grpc = run_h2load(f"http://{gw_grpc}{SERVICE}/Infer", single, conc, d, 1)
                    m_grpc = run_h2load(
                        f"http://127.0.0.1:{grpc_port}/inference.GRPCInferenceService/ModelInfer",
                        mls_grpc,
                        conc,
                        d,
                        1,
                    )
                    errors = sum(int(r["errors"]) for r in (g_http, m_rest, g_grpc, m_grpc))
                    print(
                        f"| {image.name} | {conc} | {g_http['rps']:.0f} | {m_rest['rps']:.0f} | "
                        f"{g_http['rps'] / m_rest['rps']:.2f} | {g_grpc['rps']:.0f} | "
                        f"{m_grpc['rps']:.0f} | {g_grpc['rps'] / m_grpc['rps']:.2f} |"
                        + (f" errors: {errors}" if errors else ""),
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
