"""`k2serve bench serve`: a load generator for the OpenAI HTTP API and the gRPC Generate API.

Pure parts (datasets, Mooncake traces, arrivals, statistics) are apart from the I/O (clients, run loop).
"""
