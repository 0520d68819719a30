"""surgery.graph: Capturing a network as a graph: the front-ends (torch.fx, fx with automatic leaves, torch.export),
example inputs, names of graph positions, FLOP counts and the table of graph ops. May import ``surgery.core``.
"""
