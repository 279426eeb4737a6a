"""gRPC plumbing the router and the workers share: TLS credentials and ports, backend errors <-> status
codes, servicers that refuse undecodable requests, engine types <-> protobuf messages."""
