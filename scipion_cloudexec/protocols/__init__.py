"""Protocols shipped by the plugin: real cryo-EM-shaped work (numpy, mrcfile, mpi4py)
that runs locally or on a cluster with identical results."""
from .protocol_power_spectra import ProtCloudPowerSpectra, PowerSpectraOutputs
from .protocol_average_spectrum import ProtCloudAverageSpectrum, AverageSpectrumOutputs
from .protocol_shell import ProtCloudShellSteps  # noqa: F401
from .protocol_shell_stream import ProtCloudShellStream  # noqa: F401
