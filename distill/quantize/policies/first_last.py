"""``first_last``: the first convolution and the classifier stay fp32 (the usual rule of thumb:
the first layer sees raw pixels with few channels, the last one writes the logits)."""
from .base import POLICIES, Selection

__all__ = ["FirstLast", "first_last_layers"]


def first_last_layers(layers):
    """Names of the first ``Convolution`` and of the last weight layer (the classifier: a
    ``FullyConnected``, or the 1×1 convolution that plays its part, as in MobileNetV2)."""
    convs = [l for l in layers if l.op == "Convolution"]
    names = [convs[0].name] if convs else []
    if layers[-1].name not in names:
        names.append(layers[-1].name)
    return names


@POLICIES.register("first_last")
class FirstLast:
    """Keep the first convolution and the last weight layer in fp32."""
    name = "first_last"

    def select(self, scorer):
        return Selection(excluded=first_last_layers(scorer.model.layers),
                         notes=["first convolution and classifier kept in fp32"])
