"""A real gRPC server and client (grpcio from PyPI) for the end-to-end tests.

No generated stubs: the service is registered with generic handlers that move raw
bytes, which keeps the test free of protoc while still speaking real gRPC (HTTP/2,
length-prefixed messages, trailers).

  python3 grpc_echo.py serve 0.0.0.0:50051
  python3 grpc_echo.py unary 10.96.0.10:50051 hello        -> prints "unary:hello"
  python3 grpc_echo.py stream 10.96.0.10:50051 hello 3     -> prints 3 lines
"""
import sys
from concurrent import futures

import grpc

SERVICE = "neutrino.test.Echo"


def serve(addr):
    def unary(request, context):
        return b"unary:" + request

    def stream(request, context):
        word, count = request.split(b" ")
        for i in range(int(count)):
            yield b"%s:%d" % (word, i)

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(addr)
    server.start()
    print("grpc echo serving on", addr, flush=True)
    server.wait_for_termination()


def main():
    mode, addr = sys.argv[1], sys.argv[2]
    if mode == "serve":
        return serve(addr)
    with grpc.insecure_channel(addr) as channel:
        if mode == "unary":
            call = channel.unary_unary("/%s/Unary" % SERVICE)
            print(call(sys.argv[3].encode(), timeout=10).decode())
        elif mode == "stream":
            call = channel.unary_stream("/%s/Stream" % SERVICE)
            for reply in call(("%s %s" % (sys.argv[3], sys.argv[4])).encode(), timeout=10):
                print(reply.decode())
        else:
            sys.exit("unknown mode " + mode)


if __name__ == "__main__":
    main()
