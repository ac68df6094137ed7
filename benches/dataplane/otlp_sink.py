#!/usr/bin/env python3
"""A minimal OTLP/gRPC trace collector for the outage benchmark: accepts every
`TraceService/Export` call and answers an empty `ExportTraceServiceResponse` (zero bytes),
counting calls and bytes. No protobuf package needed: the payload is not decoded.

    python3 otlp_sink.py --port 18696
"""

import argparse
import signal
import sys
import threading
from concurrent import futures

import grpc

METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


class Sink(grpc.GenericRpcHandler):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = 0
        self.bytes = 0

    def service(self, handler_call_details):
        if handler_call_details.method != METHOD:
            return None

        def export(request: bytes, _context) -> bytes:
            with self.lock:
                self.calls += 1
                self.bytes += len(request)
            return b""

        return grpc.unary_unary_rpc_method_handler(export, request_deserializer=None, response_serializer=None)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    a = ap.parse_args()
    sink = Sink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[sink])
    server.add_insecure_port(f"127.0.0.1:{a.port}")
    server.start()
    print(f"otlp sink listening on 127.0.0.1:{a.port}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop(1)
    print(f"otlp sink: {sink.calls} exports, {sink.bytes} bytes", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
