"""The gRPC front: a servicer translating protobuf messages to the core and back."""
