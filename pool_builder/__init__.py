"""Server side of Pool of Experts: build the pool (oracle -> library -> experts) and serve queries.

Import the submodules you need (``pool_builder.build``, ``pool_builder.consolidate``...);
importing the package itself stays cheap and does not import torch.
"""

__version__ = "0.1.0"
