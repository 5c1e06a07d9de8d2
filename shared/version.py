"""crio-py's version and the CRI version it speaks."""

VERSION = "0.1.0"
RUNTIME_NAME = "crio-py"
RUNTIME_API_VERSION = "v1"
KUBE_API_VERSION = "0.1.0"
