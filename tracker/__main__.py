import sys
import warnings

from .cli import main

# The commands print their own warning about untrained weights; Python's would repeat it.
warnings.filterwarnings("ignore", message="UNTRAINED WEIGHTS")
sys.exit(main())
