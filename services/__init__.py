"""The five processes of crio-py, one package each."""
