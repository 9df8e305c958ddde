"""facegate service: gRPC generation server, generators, config, metrics and CLI."""
