"""Form parameters (and their validation) the plugin's protocols share."""
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


def validateBox(protocol):
    """Errors about the box of a protocol built with :func:`addMicrographsAndBox`."""
    errors = []
    box = protocol.boxSize.get()
    if box is not None and box % 2:
        errors.append('The power spectrum box must be even.')
    mics = protocol.inputMicrographs.get()
    if mics is not None and box is not None:
        dim = mics.getDimensions()
        if dim is not None and (box > dim[0] or box > dim[1]):
            errors.append('The box (%d px) is larger than the micrographs '
                          '(%d x %d px).' % (box, dim[0], dim[1]))
    return errors
