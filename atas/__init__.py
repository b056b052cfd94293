"""atas: fast adversarial training with adaptive step size (ATAS) and its peers, evaluated honestly.

In your own loop (docs/own-code.md, examples/own_loop.py):

    atk = atas.ATAS(eps=8/255, num_samples=len(train_set), epochs=30, augment=atas.RandomCropFlip(pad=4))
    loader = DataLoader(atas.IndexedDataset(train_set), batch_size=128, shuffle=True)
    for x, y, idx in atk.batches(loader, device):
        x_adv = atk.perturb(model, x, y, idx)
        loss = atk.loss(model, x_adv, y, x)

The whole run, as `atas train` does it:

    cfg = atas.load_config("fmnist", ["method.name=atas", "train.epochs=5"])
    run = atas.train(cfg)                      # checkpoints, metrics, probe in runs/<name>/

Catastrophic-overfitting protection in your own loop (the probe, the monitor and the guard `atas
train` uses; docs/own-code.md):

    guard = atas.Guard(model, opt, atk, probe=atas.Probe(x_val, y_val, eps=0.2))
    for epoch in guard.epochs(30):             # a rollback replays the undone epochs
        ...                                    # the epoch, as above
        guard.end_epoch(epoch)                 # probe, verdict, keep the healthy state or roll back

Any model, trained here or not:

    result = atas.benchmark(model, "fmnist", eps=0.2, attacks=["clean", "pgd", "aa"])
"""

from atas.augment import RandomCropFlip
from atas.averaging import WeightAverage
from atas.config import Config, ConfigError, load_config, parse_fraction
from atas.errors import AtasError
from atas.evaluation import evaluate, format_table
from atas.evaluation.run import load_test_set
from atas.export import export_model, load_model
from atas.external_eval import benchmark
from atas.guard import Guard
from atas.indexed import IndexedDataset
from atas.methods import Method, get_method, list_methods, method
from atas.methods.aaer import NAAER, RSAAER
from atas.methods.atas import ATAS
from atas.methods.converge_smooth import FGSMMEPCS, FGSMRSCS
from atas.methods.elle import ELLE, ELLEA
from atas.methods.fgsm import FGSMAT
from atas.methods.fgsm_pco import FGSMPCO
from atas.methods.fgsm_pgi import FGSMPGI
from atas.methods.fgsm_rs import FGSMRS
from atas.methods.fgsm_uap import FGSMCUAP, FGSMFUAP, FGSMUAP
from atas.methods.free import Free
from atas.methods.gat import GAT
from atas.methods.grad_align import GradAlign
from atas.methods.liet import LIET
from atas.methods.n_fgsm import NFGSM
from atas.methods.nuat import NuAT
from atas.methods.pgd import PGDAT
from atas.methods.ssat import SSAT
from atas.methods.zerograd import MultiGrad, ZeroGrad
from atas.models import NormalizedModel, build_model, register as register_model
from atas.monitor import COMonitor, Probe
from atas.provenance import __version__
from atas.trainer import train

__all__ = [
    "ATAS",
    "FGSMRS",
    "NFGSM",
    "GradAlign",
    "FGSMPGI",
    "Free",
    "PGDAT",
    "ELLE",
    "ELLEA",
    "GAT",
    "NuAT",
    "SSAT",
    "LIET",
    "FGSMPCO",
    "FGSMUAP",
    "FGSMCUAP",
    "FGSMFUAP",
    "FGSMAT",
    "FGSMRSCS",
    "FGSMMEPCS",
    "ZeroGrad",
    "MultiGrad",
    "NAAER",
    "RSAAER",
    "Method",
    "method",
    "get_method",
    "list_methods",
    "RandomCropFlip",
    "IndexedDataset",
    "benchmark",
    "load_test_set",
    "NormalizedModel",
    "build_model",
    "register_model",
    "Config",
    "AtasError",
    "ConfigError",
    "load_config",
    "parse_fraction",
    "train",
    "evaluate",
    "format_table",
    "export_model",
    "load_model",
    "Probe",
    "COMonitor",
    "Guard",
    "WeightAverage",
    "__version__",
]
