"""Identity filter: detect, align, embed and match faces against training identities.

This package holds no gRPC or metrics code; the service and the CLI build on it.
"""
