"""Writes a stamped copy of a decision-kernel module: clock64/globaltimer at points of the kernel into a device
buffer (PackedLM.stamps, 25 pairs). Usage: make_stamp.py SRC DST"""
import sys
s = open(sys.argv[1]).read().replace("from .lm import", "from agents.lm import")
def rep(old, new):
    global s
    assert old in s, old
    s = s.replace(old, new, 1)
rep('''    @triton.jit
    def _mlp(''', '''    @triton.jit
    def _stamp(ptr, i, x):
        c = tl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,f", [x], dtype=tl.int64, is_pure=False, pack=1)
        g = tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,f", [x], dtype=tl.int64, is_pure=False, pack=1)
        tl.store(ptr + 2 * i, c)
        tl.store(ptr + 2 * i + 1, g)

    @triton.jit
    def _mlp(''')
rep('ids_ptr, out_ptr, emb_ptr, q0_ptr,', 'ids_ptr, out_ptr, stamp_ptr, emb_ptr, q0_ptr,')
rep('''        b = tl.program_id(0)
''', '''        b = tl.program_id(0)
        _stamp(stamp_ptr, 0, b.to(tl.float32))
''')
rep('''        qk_off = (tok * NPOS''', '''        _stamp(stamp_ptr, 2, tl.max(tl.max(h, 1), 0))
        qk_off = (tok * NPOS''')
rep('''            attn += tl.dot(p, vo, input_precision=PRECISION)
''', '''            attn += tl.dot(p, vo, input_precision=PRECISION)
            _stamp(stamp_ptr, 3 + head, tl.max(tl.max(attn, 1), 0))
''')
rep('''        h = _mlp(h + attn, 0,''', '''        _stamp(stamp_ptr, 25, tl.max(tl.max(h + attn, 1), 0))
        h = _mlp(h + attn, 0,''')
rep('''        for layer in range(1, L):
''', '''        _stamp(stamp_ptr, 7, tl.max(tl.max(h, 1), 0))
        for layer in range(1, L):
''')
rep('''                p = _attention_weights(q, k, rows, parent, scale, P, PRECISION)
                if FOLD_VO:''', '''                _stamp(stamp_ptr, 9 + 3 * head, tl.max(tl.max(q, 1), 0) + tl.max(tl.max(k, 1), 0))
                p = _attention_weights(q, k, rows, parent, scale, P, PRECISION)
                _stamp(stamp_ptr, 10 + 3 * head, tl.max(tl.max(p, 1), 0))
                if FOLD_VO:''')
rep('''                    attn += tl.dot(o, wo, input_precision=PRECISION)
''', '''                    attn += tl.dot(o, wo, input_precision=PRECISION)
                _stamp(stamp_ptr, 11 + 3 * head, tl.max(tl.max(attn, 1), 0))
''')
rep('''            h = _mlp(h + attn, layer,''', '''            _stamp(stamp_ptr, 8, tl.max(tl.max(h + attn, 1), 0))
            h = _mlp(h + attn, layer,''')
rep('''        norm_w = tl.load(norm_ptr + cd)''', '''        _stamp(stamp_ptr, 21, tl.max(tl.max(h, 1), 0))
        norm_w = tl.load(norm_ptr + cd)''')
rep('''        tl.store(out_ptr + b * 3, crops_tok)''', '''        _stamp(stamp_ptr, 23, blocks_tok.to(tl.float32))
        tl.store(out_ptr + b * 3, crops_tok)''')
rep('''        tl.store(out_ptr + b * 3 + 2, blocks_tok)
''', '''        tl.store(out_ptr + b * 3 + 2, blocks_tok)
        _stamp(stamp_ptr, 24, blocks_tok.to(tl.float32))
''')
rep('''            ids, out, w["emb"], w["q0"],''', '''            ids, out, self.stamps, w["emb"], w["q0"],''')
rep('''        self.fold_vo = False''', '''        self.fold_vo = False
        self.stamps = torch.zeros(64, dtype=torch.int64, device=device)''')
open(sys.argv[2], "w").write(s)
