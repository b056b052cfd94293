"""The residual blocks pinned by hand: which tensor a down-sampling block's 1x1 shortcut reads.

PreActResNet-18 (Wong et al. 2020, the official ATAS code) applies the shortcut conv to the block's
raw input x; WideResNet's official block applies it to relu(bn1(x)). One tiny block with hand-set
weights, whose output is computed by hand below, tells the two apart.
"""

import torch

from atas.models import PreActBlock, WideBlock, build_model

# x, one image of one channel, 2x2. Through a stride-2 block the output is 1x1.
X = torch.tensor([[[[-1.0, 2.0], [3.0, -4.0]]]])


def _hand_set(block):
    """BN = identity (eval mode, running mean 0, var 1, eps 0, weight 1, bias 0); conv1 all ones;
    conv2 0.5 at the centre tap only; shortcut 1x1 weight 2."""
    with torch.no_grad():
        for bn in (block.bn1, block.bn2):
            bn.eps = 0.0
            bn.weight.fill_(1.0), bn.bias.zero_()
            bn.running_mean.zero_(), bn.running_var.fill_(1.0)
        block.conv1.weight.fill_(1.0)
        block.conv2.weight.zero_()
        block.conv2.weight[0, 0, 1, 1] = 0.5
        block.shortcut.weight.fill_(2.0)
    return block.eval()


def test_downsampling_preact_block_shortcut_reads_raw_input():
    # By hand: relu(bn1(x)) = [[0, 2], [3, 0]]. conv1 (3x3, stride 2, pad 1) at the one output
    # position covers the whole 2x2 input with weight 1: 0 + 2 + 3 + 0 = 5. relu(bn2(5)) = 5;
    # conv2 (3x3, pad 1) on a 1x1 map uses only its centre tap: 0.5 * 5 = 2.5.
    # Shortcut (1x1, stride 2) reads x[0, 0] = -1 of the RAW input: 2 * -1 = -2.
    # Output: 2.5 + (-2) = 0.5.
    block = _hand_set(PreActBlock(1, 1, stride=2))
    with torch.no_grad():
        out = block(X)
    assert out.shape == (1, 1, 1, 1)
    assert out.item() == 0.5


def test_wide_block_shortcut_reads_preactivated_input():
    # Same weights; the shortcut now reads relu(bn1(x))[0, 0] = relu(-1) = 0: 2.5 + 0 = 2.5.
    block = _hand_set(WideBlock(1, 1, stride=2, dropout=0.0))
    with torch.no_grad():
        assert block(X).item() == 2.5


def test_networks_use_the_intended_blocks():
    prn = build_model("preact_resnet18", 10).net
    down = [prn.layer2[0], prn.layer3[0], prn.layer4[0]]
    assert all(type(b) is PreActBlock and b.shortcut is not None and not b.shortcut_preactivated for b in down)
    assert all(b.shortcut is None for b in [prn.layer1[0], prn.layer1[1], prn.layer2[1]])
    wrn = build_model("wrn28_10", 10).net
    firsts = [wrn.block1[0], wrn.block2[0], wrn.block3[0]]  # 16->160 (stride 1), then stride 2
    assert all(isinstance(b, WideBlock) and b.shortcut is not None and b.shortcut_preactivated for b in firsts)
