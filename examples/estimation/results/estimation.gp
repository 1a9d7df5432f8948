# estimation.gp, written by bkn_estimation: run `gnuplot estimation.gp` in this folder
set terminal pngcairo size 1300,620 font 'sans,11'
set output 'estimation.png'
set datafile separator ','
set logscale x 2
set logscale y 10
set mytics 10
set ytics (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)
set xtics (2, 4, 8)
set xrange [1.6:10]
set grid xtics ytics mytics lc rgb '#dddddd'
set xlabel 'micro-batch size m'
set multiplot layout 1,2 title 'Estimation error of per-channel statistics, mean of layers 2-4 (4000 micro-batches per m, truth from 200000 samples, seed 1)'
$M0 << EOD
2,0.837504,0.00779905,0.497023,0.00383035
4,0.539337,0.00489594,0.25077,0.00158024
8,0.297551,0.00206969,0.124566,0.000681936
EOD
$M1 << EOD
2,0.267923,0.00328904,0.423762,0.00371348
4,0.171583,0.00272786,0.206435,0.00152504
8,0.142476,0.00182702,0.105934,0.000669967
EOD
$M2 << EOD
2,0.307204,0.00292015,0.440384,0.00372146
4,0.169421,0.00218323,0.213837,0.00151884
8,0.115488,0.00129821,0.106249,0.000658751
EOD
$M3 << EOD
2,0.404635,0.00308381,0.46264,0.00375738
4,0.222569,0.00226846,0.227649,0.00153653
8,0.129867,0.00117548,0.112514,0.000663728
EOD
$M4 << EOD
2,0.611455,0.00537992,0.485322,0.00382035
4,0.171735,0.00272882,0.206474,0.00152466
8,0.142476,0.00182702,0.105934,0.000669967
EOD
$M5 << EOD
2,0.625937,0.00538331,0.48725,0.00381799
4,0.169561,0.00218474,0.213867,0.00151853
8,0.115488,0.00129821,0.106249,0.000658751
EOD
$M6 << EOD
2,0.660835,0.0055223,0.490329,0.00381931
4,0.222635,0.00226906,0.227659,0.00153639
8,0.129867,0.00117548,0.112514,0.000663728
EOD
$REF << EOD
2,0.79,0.22
4,0.48,0.09
8,0.26,0.05
EOD
set title 'variance: relative MSE'
set ylabel 'mean of (v_{est} - v)^2 / v^2'
set key bottom left box opaque font ',10'
plot $M0 using 1:2:3 with yerrorlines lw 2 pt 7 ps 1.2 dt 1 lc rgb '#000000' title 'batch statistics', \
     $M1 using 1:2:3 with yerrorlines lw 2 pt 7 ps 1.2 dt 1 lc rgb '#1f77b4' title 'BKN q=0.1', \
     $M2 using 1:2:3 with yerrorlines lw 2 pt 7 ps 1.2 dt 1 lc rgb '#2ca02c' title 'BKN q=0.3', \
     $M3 using 1:2:3 with yerrorlines lw 2 pt 7 ps 1.2 dt 1 lc rgb '#d62728' title 'BKN q=0.5', \
     $M4 using 1:2:3 with yerrorlines lw 2 pt 6 ps 1.2 dt 2 lc rgb '#1f77b4' title 'BKN q=0.1 + skip', \
     $M5 using 1:2:3 with yerrorlines lw 2 pt 6 ps 1.2 dt 2 lc rgb '#2ca02c' title 'BKN q=0.3 + skip', \
     $M6 using 1:2:3 with yerrorlines lw 2 pt 6 ps 1.2 dt 2 lc rgb '#d62728' title 'BKN q=0.5 + skip', \
     $REF using 1:2 with points pt 2 ps 1.5 lc rgb '#000000' title 'math.md: batch statistics', \
     $REF using 1:3 with points pt 2 ps 1.5 lc rgb '#1f77b4' title 'math.md: BKN q=0.1'
set title 'mean: MSE / true variance'
set ylabel 'mean of (mu_{est} - mu)^2 / v'
unset key
plot $M0 using 1:4:5 with yerrorlines lw 2 pt 7 ps 1.2 dt 1 lc rgb '#000000' title 'batch statistics', \
     $M1 using 1:4:5 with yerrorlines lw 2 pt 7 ps 1.2 dt 1 lc rgb '#1f77b4' title 'BKN q=0.1', \
     $M2 using 1:4:5 with yerrorlines lw 2 pt 7 ps 1.2 dt 1 lc rgb '#2ca02c' title 'BKN q=0.3', \
     $M3 using 1:4:5 with yerrorlines lw 2 pt 7 ps 1.2 dt 1 lc rgb '#d62728' title 'BKN q=0.5', \
     $M4 using 1:4:5 with yerrorlines lw 2 pt 6 ps 1.2 dt 2 lc rgb '#1f77b4' title 'BKN q=0.1 + skip', \
     $M5 using 1:4:5 with yerrorlines lw 2 pt 6 ps 1.2 dt 2 lc rgb '#2ca02c' title 'BKN q=0.3 + skip', \
     $M6 using 1:4:5 with yerrorlines lw 2 pt 6 ps 1.2 dt 2 lc rgb '#d62728' title 'BKN q=0.5 + skip'
unset multiplot
