"""Form parameters the plugin's protocols share."""
from pyworkflow.protocol import params


def addMicrographsAndBox(form):
    """The 'Input' section: the micrographs and the power-spectrum tile size."""
    form.addSection(label='Input')
    form.addParam('inputMicrographs', params.PointerParam,
                  pointerClass='SetOfMicrographs', important=True,
                  label='Input micrographs')
    form.addParam('boxSize', params.IntParam, default=256,
                  validators=[params.GE(8)],
                  label='Power spectrum box (px)',
                  help='Size of the tiles whose periodograms are averaged. '
                       'Must be even and fit in the micrographs.')
