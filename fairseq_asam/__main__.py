"""`python -m fairseq_asam` prints the path to give fairseq's --user-dir."""

import os

print(os.path.dirname(os.path.abspath(__file__)))
